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
