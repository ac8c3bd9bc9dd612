"""Evaluation: sharding across ranks with padding, per-task scoring."""

from __future__ import annotations

import pytest

from mil_plugins.evaluate import predict, score_predictions


class S:
    def __init__(self, i):
        self.id, self.answer = f"s{i}", "red" if i % 2 else "a red circle"
        self.task, self.metric = ("color", "exact_match") if i % 2 else ("caption", "bleu4")


class EchoModel:
    """Answers every sample with its reference, and records generate() calls."""

    training = False

    def __init__(self):
        self.calls = []

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, batch, max_new_tokens, **kwargs):
        self.calls.append(kwargs)
        return list(batch["answers"])


def loader(samples, mode, batch_size):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        yield {"ids": [s.id for s in chunk], "answers": [s.answer for s in chunk],
               "tasks": [s.task for s in chunk], "metrics": [s.metric for s in chunk]}


class FakeDist:
    def __init__(self, rank, world, parts):
        self.rank, self.world_size, self.parts = rank, world, parts

    def gather(self, obj):
        self.parts[self.rank] = obj
        return [self.parts.get(r, []) for r in range(self.world_size)]


def test_ranks_pad_to_equal_work_and_drop_the_padding():
    samples = [S(i) for i in range(5)]
    parts: dict = {}
    models = [EchoModel(), EchoModel()]
    for rank in (1, 0):  # rank 0 last, so its gather sees both parts
        rows = predict(models[rank], samples, loader, dist=FakeDist(rank, 2, parts), batch_size=2)
    assert sorted(r["id"] for r in rows) == [f"s{i}" for i in range(5)]
    assert len(models[0].calls) == len(models[1].calls) == 2  # 3 samples each, batches of 2
    assert all(c.get("synced_gpus") for m in models for c in m.calls)


def test_single_process_scores_each_task_with_its_metric():
    rows = predict(EchoModel(), [S(i) for i in range(4)], loader, batch_size=3)
    scored = score_predictions(rows)
    assert scored["n"] == 4 and set(scored["tasks"]) == {"caption", "color"}
    assert scored["tasks"]["color"] == pytest.approx(100.0)
    assert scored["score"] == pytest.approx(sum(scored["tasks"].values()) / 2)


def test_a_task_may_not_mix_metrics():
    rows = [{"task": "t", "metric": "exact_match", "prediction": "a", "answer": "a"},
            {"task": "t", "metric": "bleu4", "prediction": "a", "answer": "a"}]
    with pytest.raises(ValueError, match="mixes metrics"):
        score_predictions(rows)


# -- closed-set answers (eval.choices: task) --------------------------------------------------------
class Q:
    """A manifest sample: a conversation, its task and metric."""

    def __init__(self, i, answer, task="color", metric="exact_match"):
        self.id, self.task, self.metric = f"q{i}", task, metric
        self.conversations = [{"from": "human", "value": "<vec> which?"},
                              {"from": "gpt", "value": answer}]
        self.answer = answer


def spell(sample, text):
    """A stand-in tokenizer: one id per character."""
    return [ord(c) for c in text]


class ChooserModel(EchoModel):
    """Scores the reference answer 0 and every other option -1 (or, ``wrong``, the reverse)."""

    def __init__(self, wrong=False):
        super().__init__()
        self.wrong, self.scored = wrong, []

    def option_log_likelihoods(self, batch, options):
        assert len(options) == len(batch["ids"])
        self.scored.append(list(batch["ids"]))
        texts = [["".join(map(chr, o)) for o in opts] for opts in options]
        return [[-float((t == ref) == self.wrong) for t in row]
                for row, ref in zip(texts, batch["answers"])]


def test_a_tasks_candidates_are_its_distinct_answers_as_exact_match_compares_them():
    from mil_plugins.choices import choose, sample_options, task_answer_sets

    samples = [Q(0, "red"), Q(1, "Blue"), Q(2, "blue."), Q(3, "red"), Q(4, "Two", task="count"),
               Q(5, "2", task="count"), Q(6, "three", task="count"),
               Q(7, "a red circle", task="caption", metric="bleu4")]
    assert task_answer_sets(samples) == {"color": ["Blue", "red"], "count": ["Two", "three"]}
    opts = sample_options(samples, spell)
    assert opts[7] is None and opts[0] == opts[2] == [("Blue", spell(0, "Blue")), ("red", spell(0, "red"))]
    assert [t for t, _ in opts[5]] == ["Two", "three"]
    assert choose([-3.0, -1.0, -1.0, -2.0]) == 1


def test_closed_set_rows_are_chosen_and_the_others_generated_in_one_batch():
    from mil_plugins.choices import sample_options

    samples = [Q(0, "red"), Q(1, "a red circle", task="caption", metric="bleu4"), Q(2, "blue"),
               Q(3, "green"), Q(4, "a blue square", task="caption", metric="bleu4")]
    options = sample_options(samples, spell)
    model = ChooserModel()
    rows = predict(model, samples, loader, batch_size=5, options=options)
    assert [r["prediction"] for r in rows] == [s.answer for s in samples]
    assert model.scored == [["q0", "q2", "q3"]] and len(model.calls) == 1  # one call of each kind
    wrong = predict(ChooserModel(wrong=True), samples, loader, batch_size=5, options=options)
    assert [r["prediction"] for r in wrong] == ["blue", "a red circle", "green", "blue",
                                                 "a blue square"]  # the first other candidate
    scored = score_predictions(wrong)
    assert scored["tasks"]["color"] == 0.0
    with pytest.raises(ValueError, match="2 option lists for 5 samples"):
        predict(model, samples, loader, options=options[:2])


@pytest.mark.parametrize("captions", [False, True])
def test_ranks_choose_in_lock_step(captions):
    """Every rank makes the same calls per batch (ZeRO-3 gathers parameters in step), even when
    only one rank's batches hold a generated (caption) sample."""
    from mil_plugins.choices import sample_options

    samples = [Q(i, ["red", "blue", "green"][i % 3]) for i in range(5)]
    if captions:  # rank 0 gets samples 0, 2, 4, 6: only it has captions
        samples[4] = Q(4, "a red circle", task="caption", metric="bleu4")
        samples.append(Q(5, "blue"))
        samples.append(Q(6, "a blue square", task="caption", metric="bleu4"))
    options = sample_options(samples, spell)
    parts: dict = {}
    models = [ChooserModel(), ChooserModel()]
    for rank in (1, 0):
        rows = predict(models[rank], samples, loader, dist=FakeDist(rank, 2, parts), batch_size=2,
                       options=options)
    assert sorted((r["id"], r["prediction"]) for r in rows) == sorted((s.id, s.answer) for s in samples)
    assert len(models[0].scored) == len(models[1].scored) == 2
    assert len(models[0].calls) == len(models[1].calls) == (2 if captions else 0)


def test_a_samples_own_options_and_the_errors_that_name_it():
    from mil_plugins.choices import sample_options
    from mil_plugins.data import DataError

    samples = [Q(0, "red"), Q(1, "Two", task="count"), Q(2, "a red circle", task="caption",
                                                       metric="bleu4")]
    samples[0].options, samples[1].options = ("red", "blue", "green"), ("one", "2")
    opts = sample_options(samples, spell, "sample")
    assert [t for t, _ in opts[0]] == ["red", "blue", "green"]  # the manifest's order
    assert [t for t, _ in opts[1]] == ["one", "2"] and opts[2] is None
    samples[1].manifest, samples[1].index = "test.json", 1
    samples[1].options = ("one", "three")
    with pytest.raises(DataError, match=r"test\.json: sample 'q1' \(index 1\): the answer 'Two' is "
                                        r"not one of the sample's options \['one', 'three'\]"):
        sample_options(samples, spell, "sample")
    samples[1].options = None
    with pytest.raises(DataError, match="sample 'q1'.*this one has none"):
        sample_options(samples, spell, "sample")
    with pytest.raises(ValueError, match="one of task, sample or null"):
        sample_options(samples, spell, "all")


def test_preflight_refuses_sample_choices_without_options(tmp_path):
    """eval.choices: sample with a question that lists no options stops before any training."""
    from mil_plugins.engine.preflight import check_answer_choices
    from mil_plugins.data import DataError

    rows = [{"id": "a", "task": "color", "metric": "exact_match", "options": ["red", "blue"],
             "conversations": [{"from": "human", "value": "which?"}, {"from": "gpt", "value": "red"}]},
            {"id": "b", "task": "color", "metric": "exact_match",
             "conversations": [{"from": "human", "value": "which?"}, {"from": "gpt", "value": "blue"}]}]
    import json

    (tmp_path / "test.json").write_text(json.dumps(rows))
    recipe = {"eval": {"choices": "sample"}, "data": {"root": str(tmp_path)}, "modalities": {},
              "stages": [{"name": "s", "train": "test.json", "test": "test.json"}]}
    with pytest.raises(DataError, match=r"test\.json: sample 'b' \(index 1\): eval\.choices: sample needs"):
        check_answer_choices(recipe)
    rows[1]["options"] = ["red", "blue"]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    check_answer_choices(recipe)
    check_answer_choices({**recipe, "eval": {"choices": "task"}})  # nothing to check
