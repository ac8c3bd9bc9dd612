"""Text-only warm-up split: the benchmark's questions and answer formats, with the answer in the prompt.

The project's LLM is built from a config with no pretraining, so it knows neither the answer words
nor the question formats. This split teaches both without any media: every sample states the
scene's facts in words (all of the scene's attributes, in a random order, so that the model must
pick the one asked about), then asks one of the benchmark's questions, verbatim, or its caption
instruction. Examples::

    The color is green. It is on the right. The shape is a circle.
    What shape is shown? Answer with one word: circle, square or triangle.      -> circle

    There are two beeps. The tone is low.
    Describe the sound in a short phrase.                                       -> a sound of two low beeps

Samples cover every task of every modality in equal numbers; ``task`` is ``<modality>_<task>``
(e.g. ``image_shape``), ``metric`` and ``options`` are the source task's. No media key, no
placeholder.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .concepts import MODALITIES, SCENE_ATTRIBUTES, TASKS, balanced_scenes
from .manifest import make_sample

#: how each attribute is stated as a fact (per-modality overrides in _FACT_OVERRIDES).
FACTS = {
    "shape": "The shape is a {}.",
    "color": "The color is {}.",
    "side": "It is on the {}.",
    "direction": "It moves {}.",
    "pitch": "The tone is {}.",
    "count": "There are {} beeps.",
    "distance": "The object is {}.",
    "shape3d": "The shape is a {}.",
}
_FACT_OVERRIDES = {
    ("depth", "side"): "The {} side is nearer.",
    ("point", "color"): "The points are {}.",
}


def fact(modality: str, attribute: str, value: str) -> str:
    if attribute == "count" and value == "one":
        return "There is one beep."
    return _FACT_OVERRIDES.get((modality, attribute), FACTS[attribute]).format(value)


def facts(modality: str, attrs: Mapping[str, str], rng: np.random.Generator) -> str:
    names = list(SCENE_ATTRIBUTES[modality])
    order = rng.permutation(len(names))
    return " ".join(fact(modality, names[i], attrs[names[i]]) for i in order)


def generate_text_split(split: str, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` text-only samples, tasks interleaved round-robin over every (modality, task)."""
    sources = [(m, t) for m in MODALITIES for t in TASKS[m]]
    per_source = {}
    for k, (m, t) in enumerate(sources):
        count = len(range(k, n, len(sources)))
        per_source[(m, t.name)] = iter(balanced_scenes(m, count, rng))
    samples = []
    for i in range(n):
        m, t = sources[i % len(sources)]
        attrs = next(per_source[(m, t.name)])
        question = f"{facts(m, attrs, rng)}\n{t.question}"
        samples.append(make_sample(f"text-{split}-{i + 1:05d}", question, t.answer(attrs),
                                   task=f"{m}_{t.name}", metric=t.metric, options=t.options))
    return samples
