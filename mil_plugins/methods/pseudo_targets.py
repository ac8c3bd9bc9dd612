"""Pseudo targets of earlier task types for a new stage's inputs (MoInCL's PTGM).

When a stage brings a task type that is new for a modality already seen (QA after captioning, or
captioning after QA), the model as it was before the stage writes targets of the *earlier* task
type for the new stage's own inputs: captions when the new task is QA, answers to the earlier
stage's questions when it is captioning. They are then trained alongside the stage's data.

A stage's task types come from its samples' ``metric``: ``bleu4`` / ``cider`` -> ``caption``,
anything else (``exact_match``, ``vqa``, none) -> ``qa``; a method may override them per stage.

The prompts (our choices; the paper's code captions with "describe the {modality}." and takes
question-answer pairs that were precomputed from captions):

``caption``
    the earlier caption stages' instruction for that modality (their most frequent first human
    turn), so the words are ones the model was taught;
``qa``
    one of the earlier QA stages' distinct questions for that modality, drawn per input with
    ``ctx.generator`` (seeded by run seed, stage and sample id).

The model answers greedily (:meth:`generate`); empty answers are dropped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from mil_plugins.methods._common import salt

CAPTION_METRICS = ("bleu4", "cider")
TASK_TYPES = ("caption", "qa")


def sample_task_type(sample) -> str:
    return "caption" if getattr(sample, "metric", None) in CAPTION_METRICS else "qa"


def stage_task_types(stage, overrides: dict | None = None) -> set[str]:
    """The task types of ``stage``: ``overrides[stage.name]`` (a name or a list) or its samples'."""
    given = (overrides or {}).get(stage.name)
    if given is not None:
        types = {given} if isinstance(given, str) else set(given)
        bad = sorted(types - set(TASK_TYPES))
        if bad:
            raise ValueError(f"task type(s) {bad} of stage {stage.name!r}; valid: {list(TASK_TYPES)}")
        return types
    return {sample_task_type(s) for s in stage.train_samples}


def earlier_types(stages, stage, overrides: dict | None = None) -> dict[str, list]:
    """``{task type: earlier training samples of it}`` for the task types that stages before
    ``stage`` trained on ``stage.modality`` and ``stage`` itself does not bring."""
    if stage.modality is None:
        return {}
    mine = stage_task_types(stage, overrides)
    out: dict[str, list] = {}
    for st in stages:
        if st.index >= stage.index or st.modality != stage.modality:
            continue
        given = (overrides or {}).get(st.name)
        for s in st.train_samples:
            kind = (given if isinstance(given, str) else None) or sample_task_type(s)
            if kind not in mine:
                out.setdefault(kind, []).append(s)
    return out


def _first_human(sample) -> str:
    return next(t["value"] for t in sample.conversations if t["from"] == "human")


def _fits(prompt: str, sample, modality: str, placeholder: str) -> bool:
    """``prompt``'s placeholders match ``sample``'s media (one modality, one file per placeholder)."""
    if sorted(m for m, files in sample.media.items() if files) != [modality]:
        return False
    return prompt.count(placeholder) == len(sample.media[modality])


def pseudo_prompts(ctx, stage, kind: str, earlier: list, placeholder: str) -> list[tuple[str, str]]:
    """``(sample id, prompt)`` per input of ``stage`` for pseudo targets of task type ``kind``."""
    prompts = [_first_human(s) for s in earlier]
    if kind == "caption":
        counts = Counter(prompts)
        top = max(counts.values())
        choices = [sorted(p for p, n in counts.items() if n == top)[0]]
    else:
        choices = sorted(set(prompts))
    out = []
    for s in stage.train_samples:
        fitting = [p for p in choices if _fits(p, s, stage.modality, placeholder)]
        if not fitting:
            continue
        if len(fitting) == 1:
            out.append((str(s.id), fitting[0]))
            continue
        g = ctx.generator(salt("moincl", "question", s.id))
        out.append((str(s.id), fitting[int(torch.randint(len(fitting), (1,), generator=g))]))
    return out


def as_sample(sample, prompt: str, answer: str, kind: str, suffix: str = "pseudo"):
    """A copy of ``sample`` (same media) asking ``prompt`` and answering ``answer``."""
    return dataclasses.replace(
        sample, id=f"{sample.id}#{suffix}-{kind}",
        conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        task=f"pseudo_{kind}", metric="cider" if kind == "caption" else "exact_match")


@torch.no_grad()
def generate(ctx, model, samples: list, batch_size: int, max_new_tokens: int) -> list[str]:
    """``model``'s greedy answers to ``samples``' prompts, in order (routing hooks run first)."""
    answers: list[str] = []
    for batch in ctx.make_loader(samples, mode="eval", batch_size=batch_size):
        if ctx.before_forward is not None:
            ctx.before_forward(batch)
        answers.extend(model.generate(batch, max_new_tokens=max_new_tokens))
    return answers
