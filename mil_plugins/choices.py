"""Closed-set answers (``eval.choices: task``): each exact-match sample is answered by the candidate
its model finds likeliest, instead of by free generation.

A task's candidates are the distinct reference answers of that task among the samples evaluated
together (one stage's test split), compared as exact match compares them (``"Two"`` and ``"2"``
are one candidate). Each candidate is tokenised as training tokenises an answer after that sample's
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

from mil_plugins.evaluate import DEFAULT_METRIC
from mil_plugins.scoring import normalize_answer

#: the modes of ``eval.choices``; ``None`` is free generation
MODES = ("task",)
#: the metrics whose samples are answered from a closed set
CLOSED_SET_METRICS = ("exact_match",)

Option = tuple[str, list[int]]


def reference_answer(sample: Any) -> str:
    turns = sample["conversations"] if isinstance(sample, Mapping) else sample.conversations
    return str(turns[-1]["value"])


def _task(sample: Any) -> str:
    return (sample.get("task") if isinstance(sample, Mapping) else sample.task) or "default"


def _metric(sample: Any) -> str:
    return (sample.get("metric") if isinstance(sample, Mapping) else sample.metric) or DEFAULT_METRIC


def task_answer_sets(samples: Sequence[Any]) -> dict[str, list[str]]:
    """``{task: candidates}`` over the closed-set samples: each distinct answer once (by its
    normalised form, spelled as the first sample that gives it), in sorted order."""
    seen: dict[str, dict[str, str]] = {}
    for sample in samples:
        if _metric(sample) not in CLOSED_SET_METRICS:
            continue
        answer = reference_answer(sample)
        seen.setdefault(_task(sample), {}).setdefault(normalize_answer(answer), answer)
    return {task: sorted(forms.values()) for task, forms in sorted(seen.items())}


def sample_options(samples: Sequence[Any], encode: Any) -> list[list[Option] | None]:
    """Per sample (in order): its task's candidates as ``(text, token ids)``, the ids from
    ``encode(sample, text)``; ``None`` for a sample that is generated (another metric)."""
    sets = task_answer_sets(samples)
    out: list[list[Option] | None] = []
    for sample in samples:
        if _metric(sample) not in CLOSED_SET_METRICS:
            out.append(None)
            continue
        out.append([(text, list(encode(sample, text))) for text in sets[_task(sample)]])
    return out


def choose(scores: Sequence[float]) -> int:
    """The index of the highest score (the first on a tie)."""
    best = 0
    for j, s in enumerate(scores):
        if s > scores[best]:
            best = j
    return best
