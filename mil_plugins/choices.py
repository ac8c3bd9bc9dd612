"""Closed-set answers (``eval.choices``): each exact-match sample is answered by the candidate its
model finds likeliest, instead of by free generation. The candidates:

    task     the distinct reference answers of the sample's task among the samples evaluated
             together (one stage's test split), compared as exact match compares them (``"Two"``
             and ``"2"`` are one candidate)
    sample   the sample's own ``options`` in the manifest (the question's answer choices, as
             multiple-choice benchmarks list them); every exact-match sample must have them, and
             its reference answer must be one of them

Each candidate is tokenised as training tokenises an answer after that sample's
prompt (:func:`~mil_plugins.data.tokenize.encode_answer`, separator included), and the model picks
the one of highest summed log-probability
(:meth:`~mil_plugins.model.mllm.MultimodalLM.option_log_likelihoods`), as lm-evaluation-harness
scores multiple-choice tasks (``acc``) and SEED-Bench scores its questions.

Chance is then exactly one over the task's number of candidates, and a model that has forgotten a
task lands near chance rather than at whatever its free text happens to match. Tasks scored with
another metric (``bleu4``, ``cider``, ``vqa``) are still generated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mil_plugins.scoring import DEFAULT_METRIC, normalize_answer

#: the modes of ``eval.choices``; ``None`` is free generation
MODES = ("task", "sample")
#: the metrics whose samples are answered from a closed set
CLOSED_SET_METRICS = ("exact_match",)

Option = tuple[str, list[int]]


def reference_answer(sample: Any) -> str:
    turns = sample["conversations"] if isinstance(sample, Mapping) else sample.conversations
    return str(turns[-1]["value"])


def task_of(sample: Any) -> str:
    return (sample.get("task") if isinstance(sample, Mapping) else sample.task) or "default"


def metric_of(sample: Any) -> str:
    metric = sample.get("metric") if isinstance(sample, Mapping) else sample.metric
    return metric or DEFAULT_METRIC


def task_answer_sets(samples: Sequence[Any]) -> dict[str, list[str]]:
    """``{task: candidates}`` over the closed-set samples: each distinct answer once (by its
    normalised form, spelled as the first sample that gives it), in sorted order."""
    seen: dict[str, dict[str, str]] = {}
    for sample in samples:
        if metric_of(sample) not in CLOSED_SET_METRICS:
            continue
        answer = reference_answer(sample)
        seen.setdefault(task_of(sample), {}).setdefault(normalize_answer(answer), answer)
    return {task: sorted(forms.values()) for task, forms in sorted(seen.items())}


def own_options(sample: Any) -> list[str]:
    """A sample's ``options`` from its manifest; :class:`DataError` when it has none or when its
    reference answer is not one of them (as exact match compares them)."""
    from mil_plugins.data.errors import DataError

    if isinstance(sample, Mapping):
        options = sample.get("options")
    else:
        options = getattr(sample, "options", None)
    where = {key: getattr(sample, attr, None)
             for key, attr in (("manifest", "manifest"), ("sample_id", "id"), ("index", "index"))}
    if not options:
        raise DataError("eval.choices: sample needs the answer choices of every exact-match "
                        "question in its manifest ('options'); this one has none", **where)
    answer = reference_answer(sample)
    if normalize_answer(answer) not in {normalize_answer(o) for o in options}:
        raise DataError(f"the answer {answer!r} is not one of the sample's options "
                        f"{list(options)}", **where)
    return list(options)


def sample_options(samples: Sequence[Any], encode: Any, mode: str = "task"
                   ) -> list[list[Option] | None]:
    """Per sample (in order): its candidates (``mode``: ``task`` or ``sample``, see the module
    docstring) as ``(text, token ids)``, the ids from ``encode(sample, text)``; ``None`` for a
    sample that is generated (another metric)."""
    if mode not in MODES:
        raise ValueError(f"eval.choices must be one of {', '.join(MODES)} or null, got {mode!r}")
    sets = task_answer_sets(samples) if mode == "task" else {}
    out: list[list[Option] | None] = []
    for sample in samples:
        if metric_of(sample) not in CLOSED_SET_METRICS:
            out.append(None)
            continue
        texts = sets[task_of(sample)] if mode == "task" else own_options(sample)
        out.append([(text, list(encode(sample, text))) for text in texts])
    return out


def choose(scores: Sequence[float]) -> int:
    """The index of the highest score (the first on a tie)."""
    best = 0
    for j, s in enumerate(scores):
        if s > scores[best]:
            best = j
    return best
