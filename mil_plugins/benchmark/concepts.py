"""The concept space shared by every modality, the task list and the answer vocabulary.

Every sample of the benchmark is a small scene described by a few *attributes* drawn from one shared
concept space (shape, colour, left/right, direction, count, pitch, distance, 3-D shape). Each modality
renders the scene into its own file format and asks 2 QA tasks (exact match over a listed option set)
and 1 captioning-style task (BLEU-4 against a templated phrase). Concepts recur across modalities
(``shape`` in image, video and depth; ``color`` in image, video and point; ``left/right`` in image,
video and depth), so knowledge can transfer between stages and forgetting can be measured; each
modality also asks one thing only it can answer (motion direction, pitch / beep count, distance,
3-D shape).

Everything here is plain data plus a few pure functions; the renderers live in ``image.py`` ...
``point.py`` and the text-only warm-up split in ``text.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Mapping

# -- concepts ------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue")
SIDES = ("left", "right")
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = ("high", "low")
COUNTS = ("one", "two", "three")
DISTANCES = ("near", "far")
SHAPES_3D = ("sphere", "cube", "cylinder", "cone")

#: attribute name -> its values. An attribute keeps its name (and so its words) in every modality.
CONCEPTS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "side": SIDES,
    "direction": DIRECTIONS,
    "pitch": PITCHES,
    "count": COUNTS,
    "distance": DISTANCES,
    "shape3d": SHAPES_3D,
}

#: the modalities of the benchmark, in stage order, and the text-only warm-up split.
MODALITIES = ("image", "video", "audio", "depth", "point")
TEXT = "text"

#: which attributes describe a scene of each modality (all are drawn for every sample, balanced).
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "image": ("shape", "color", "side"),
    "video": ("shape", "color", "direction"),
    "audio": ("pitch", "count"),
    "depth": ("shape", "distance", "side"),
    "point": ("shape3d", "color"),
}

PLACEHOLDERS = {m: f"<{m}>" for m in MODALITIES}

EXACT_MATCH = "exact_match"
BLEU4 = "bleu4"


def options_phrase(options: tuple[str, ...]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"``; ``("a", "b")`` -> ``"a or b"``."""
    if len(options) == 1:
        return options[0]
    return ", ".join(options[:-1]) + " or " + options[-1]


# -- captions --------------------------------------------------------------------------------------

def _caption_image(a: Mapping[str, str]) -> str:
    return f"a {a['color']} {a['shape']} on the {a['side']}"


def _caption_video(a: Mapping[str, str]) -> str:
    return f"a {a['color']} {a['shape']} moving {a['direction']}"


def _caption_audio(a: Mapping[str, str]) -> str:
    noun = "beep" if a["count"] == "one" else "beeps"
    return f"a sound of {a['count']} {a['pitch']} {noun}"


def _caption_depth(a: Mapping[str, str]) -> str:
    return f"a {a['distance']} {a['shape']} on the {a['side']}"


def _caption_point(a: Mapping[str, str]) -> str:
    return f"a {a['color']} {a['shape3d']} made of points"


# -- tasks -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One task of one modality.

    ``attribute`` names the scene attribute that is the answer of a QA task (``options`` are then its
    values, listed in the question in this order); a captioning task has ``caption`` instead and no
    options. ``question`` is the text after the placeholder line.
    """

    modality: str
    name: str
    metric: str
    question: str
    attribute: str | None = None
    caption: Callable[[Mapping[str, str]], str] | None = field(default=None, compare=False)

    @property
    def options(self) -> tuple[str, ...]:
        return CONCEPTS[self.attribute] if self.attribute else ()

    def answer(self, attrs: Mapping[str, str]) -> str:
        if self.caption is not None:
            return self.caption(attrs)
        return attrs[self.attribute]

    @property
    def chance(self) -> float:
        """Expected score of a uniform random guess (see :func:`chance_level`)."""
        return chance_level(self.modality, self.name)

    def describe(self) -> dict:
        d = {"metric": self.metric, "question": self.question, "chance": round(self.chance, 4)}
        if self.options:
            d["options"] = list(self.options)
            d["attribute"] = self.attribute
        else:
            d["template"] = self.caption(_TEMPLATE_SLOTS)  # type: ignore[misc]
        return d


class _Slots(dict):
    def __missing__(self, key):  # caption templates shown with their slot names: "a {color} ..."
        return "{" + key + "}"


_TEMPLATE_SLOTS = _Slots()


def _qa(modality: str, name: str, attribute: str, question: str) -> Task:
    q = f"{question} Answer with one word: {options_phrase(CONCEPTS[attribute])}."
    return Task(modality, name, EXACT_MATCH, q, attribute=attribute)


def _cap(modality: str, question: str, fn: Callable[[Mapping[str, str]], str]) -> Task:
    return Task(modality, "caption", BLEU4, question, caption=fn)


TASKS: dict[str, tuple[Task, ...]] = {
    "image": (
        _qa("image", "shape", "shape", "What shape is shown?"),
        _qa("image", "color", "color", "What color is the shape?"),
        _cap("image", "Describe the image in a short phrase.", _caption_image),
    ),
    "video": (
        _qa("video", "direction", "direction", "Which way does the object move?"),
        _qa("video", "shape", "shape", "What shape is moving?"),
        _cap("video", "Describe the video in a short phrase.", _caption_video),
    ),
    "audio": (
        _qa("audio", "pitch", "pitch", "Is the tone high or low?"),
        _qa("audio", "count", "count", "How many beeps are there?"),
        _cap("audio", "Describe the sound in a short phrase.", _caption_audio),
    ),
    "depth": (
        _qa("depth", "distance", "distance", "Is the object near or far?"),
        _qa("depth", "side", "side", "Which side of the scene is nearer?"),
        _cap("depth", "Describe the depth map in a short phrase.", _caption_depth),
    ),
    "point": (
        _qa("point", "shape3d", "shape3d", "What 3D shape is this?"),
        _qa("point", "color", "color", "What color are the points?"),
        _cap("point", "Describe the point cloud in a short phrase.", _caption_point),
    ),
}


def get_task(modality: str, name: str) -> Task:
    for t in TASKS[modality]:
        if t.name == name:
            return t
    raise KeyError(f"no task {name!r} in modality {modality!r}; "
                   f"tasks: {[t.name for t in TASKS[modality]]}")


def all_scenes(modality: str) -> list[dict[str, str]]:
    """Every attribute combination of a modality's scenes (the caption space)."""
    names = SCENE_ATTRIBUTES[modality]
    return [dict(zip(names, vals)) for vals in itertools.product(*(CONCEPTS[n] for n in names))]


def answer_vocabulary() -> list[str]:
    """Every word that can appear in an answer (options and caption words), sorted."""
    words: set[str] = set()
    for m in MODALITIES:
        for t in TASKS[m]:
            words.update(t.options)
            if t.caption is not None:
                for a in all_scenes(m):
                    words.update(t.caption(a).split())
    return sorted(words)


# -- metrics (reference implementations, also used for the chance levels) ------------------------

def normalize_answer(text: str) -> str:
    """Lower-case, strip surrounding whitespace and trailing punctuation."""
    return text.strip().lower().rstrip(".!?,;: ").strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def bleu4(prediction: str, reference: str) -> float:
    """BLEU-4 in [0, 1] of one prediction against one reference: the evaluator's scorer
    (:func:`mil_plugins.scoring.bleu4`, pycocoevalcap) on a corpus of one sentence."""
    from mil_plugins.scoring import bleu4 as corpus

    return corpus([prediction], [reference])


def corpus_bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in [0, 1]: exactly what ``mil_plugins.scoring`` reports (x 100) for
    ``bleu4`` tasks (pycocoevalcap's ``Bleu(4)``), so chance levels sit on the evaluator's scale."""
    from mil_plugins.scoring import bleu4 as corpus

    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as references, at least one")
    return corpus(predictions, references)


METRICS = {EXACT_MATCH: exact_match, BLEU4: bleu4}


@lru_cache(maxsize=None)
def chance_level(modality: str, task: str) -> float:
    """Expected score of guessing uniformly at random among the possible answers.

    QA: 1 / number of options (answers are balanced). Captioning: corpus BLEU-4
    (:func:`corpus_bleu4`, the evaluator's metric) of the captions of uniformly random scenes
    against the true ones, i.e. taken over every (guess, truth) pair of scenes: the value that
    random guessing tends to on a large, balanced test split.
    """
    t = get_task(modality, task)
    if t.metric == EXACT_MATCH:
        return 1.0 / len(t.options)
    caps = [t.answer(a) for a in all_scenes(modality)]
    return corpus_bleu4([p for p in caps for _ in caps], [r for _ in caps for r in caps])


# -- balanced scenes -------------------------------------------------------------------------------

def balanced_scenes(modality: str, n: int, rng) -> list[dict[str, str]]:
    """``n`` scenes of ``modality`` whose every attribute is balanced (counts differ by at most 1).

    Each attribute's values are tiled to length ``n`` and shuffled independently with ``rng`` (a
    ``numpy.random.Generator``), so attributes are also (nearly) independent of each other.
    """
    import numpy as np

    cols = {}
    for name in SCENE_ATTRIBUTES[modality]:
        values = CONCEPTS[name]
        # rotate the starting value so the leftover samples (n % k) do not always favour values[0]
        start = int(rng.integers(len(values)))
        idx = (np.arange(n) + start) % len(values)
        cols[name] = [values[i] for i in rng.permutation(idx)]
    return [{name: cols[name][i] for name in cols} for i in range(n)]
