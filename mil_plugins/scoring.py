"""Answer scoring: exact match and VQA accuracy written out here; BLEU-4 and CIDEr-D by
``pycocoevalcap`` (the coco-caption scorers the field reports), on our own tokens.

``score(metric, preds, refs)`` is what evaluation calls; it returns a percentage:

    exact_match  100 x mean over examples of exact_match(pred, refs)      (normalised strings)
    vqa          100 x mean over examples of min(1, #refs equal to pred / 3)
    bleu4        100 x corpus BLEU-4, pycocoevalcap ``Bleu(4)`` (its 4th value)
    cider        100 x CIDEr-D, pycocoevalcap ``Cider`` (the original x10 scale, so a caption
                 scoring CIDEr-D 1.2 gives 120; unlike the others this is *not* bounded by 100)

Two kinds of text processing:

* :func:`normalize_answer` (exact match, VQA): lowercase; ``,`` between digits and ``.`` / ``'``
  removed ("1,000" -> "1000", "u.s." -> "us", "don't" -> "dont"), a decimal point between
  digits kept ("3.5"); every other punctuation character becomes a space; the number words
  zero..ten become digits (as VQA does); the articles a / an / the are dropped; whitespace is
  collapsed. SQuAD's normaliser plus VQA's number mapping and decimal handling.
* :func:`tokenize` (BLEU, CIDEr): the same punctuation handling and lowercasing, but articles and
  number words are kept (they matter in captions). coco-caption runs the Stanford PTB tokenizer
  (Java) first, which also lowercases and drops punctuation; we do not run Java, so our tokens
  differ from it only where PTB splits differently (e.g. "don't" -> "do n't" there, "dont" here).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

#: the metric of a sample whose manifest names none
DEFAULT_METRIC = "exact_match"

__all__ = [
    "METRICS",
    "normalize_answer",
    "tokenize",
    "exact_match",
    "vqa_accuracy",
    "bleu4",
    "cider_d",
    "score",
]

#: the metric names :func:`score` accepts
METRICS = ("exact_match", "vqa", "bleu4", "cider")

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DELETED = {".", "'", "\u2019", "`"}  # removed outright rather than turned into a space
_DECIMAL_MARK = "\x00"


def _is_punct(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat.startswith("P") or cat.startswith("S")


def _strip_punct(s: str) -> str:
    s = _DIGIT_COMMA.sub("", s)
    s = _DECIMAL_POINT.sub(_DECIMAL_MARK, s)
    out = []
    for ch in s:
        if ch in _DELETED:
            continue
        out.append(" " if _is_punct(ch) else ch)
    return "".join(out).replace(_DECIMAL_MARK, ".")


def tokenize(s: str) -> list[str]:
    """Lowercase, punctuation handled as in :func:`normalize_answer`, split on whitespace."""
    return _strip_punct(str(s).lower()).split()


def normalize_answer(s: str) -> str:
    """SQuAD/VQA-style normalisation (see the module docstring).

    >>> normalize_answer("The Two dogs, running!")
    '2 dogs running'
    """
    words = _strip_punct(str(s).lower()).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _as_refs(ref_or_refs: str | Sequence[str]) -> list[str]:
    if isinstance(ref_or_refs, str):
        return [ref_or_refs]
    refs = list(ref_or_refs)
    if not refs:
        raise ValueError("an example needs at least one reference answer")
    return [str(r) for r in refs]


def exact_match(pred: str, ref_or_refs: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the normalised reference (any of them), else 0.0."""
    p = normalize_answer(pred)
    return 1.0 if any(p == normalize_answer(r) for r in _as_refs(ref_or_refs)) else 0.0


def vqa_accuracy(pred: str, refs: str | Sequence[str]) -> float:
    """VQA accuracy min(1, #{references equal to pred} / 3), on normalised strings.

    (The official VQA script averages this over the 10 leave-one-out subsets of 9 answers; we use
    the plain formula, which agrees with it whenever the match count is 0 or at least 4.)
    """
    p = normalize_answer(pred)
    matches = sum(p == normalize_answer(r) for r in _as_refs(refs))
    return min(1.0, matches / 3.0)


# ------------------------------------------------------------------------ BLEU-4 and CIDEr-D
# The field's reference scorers (pycocoevalcap, the coco-caption code CoIN, MCITlib and the
# captioning papers report), fed with our tokens: pycocoevalcap's own PTB tokenizer needs Java, so
# every sentence goes through :func:`tokenize` and is handed over space-joined (its scorers split
# on whitespace).


def _check_pairs(preds: Sequence[str], refs_list: Sequence) -> None:
    if isinstance(preds, str):
        raise TypeError("preds must be a list of strings, not one string")
    if len(preds) != len(refs_list):
        raise ValueError(f"{len(preds)} predictions but {len(refs_list)} reference entries")


def _coco_inputs(preds: Sequence[str], refs_list: Sequence) -> tuple[dict, dict]:
    _check_pairs(preds, refs_list)
    if not preds:
        raise ValueError("no predictions to score")
    res = {i: [" ".join(tokenize(p))] for i, p in enumerate(preds)}
    gts = {i: [" ".join(tokenize(r)) for r in _as_refs(refs)] for i, refs in enumerate(refs_list)}
    return gts, res


def bleu4(preds: Sequence[str], refs_list: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1]: pycocoevalcap's ``Bleu(4)`` (coco-caption; clipped n-gram counts
    pooled over the corpus, brevity penalty from the closest reference length, no smoothing
    beyond its 1e-15 guard, so an order with no match anywhere gives ~0)."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _coco_inputs(preds, refs_list)
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def cider_d(preds: Sequence[str], refs_list: Sequence[str | Sequence[str]]) -> float:
    """CIDEr-D: pycocoevalcap's ``Cider`` (Vedantam et al. 2015; TF-IDF n-grams 1..4 with IDF
    from this corpus's references, clipped cosine, Gaussian length penalty sigma = 6, x10 scale).
    With a single example every IDF is log(1) - log(1) = 0, so the score is 0."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_inputs(preds, refs_list)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# -------------------------------------------------------------------------------------- score


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def score(metric: str, preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Score ``preds`` against ``refs`` (one string or a list of strings per example) with
    ``metric`` (one of :data:`METRICS`), as a percentage (see the module docstring).

    Raises ``ValueError`` for an unknown metric (naming the valid ones), for ``preds`` and
    ``refs`` of different lengths, and for an empty list.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    _check_pairs(preds, refs)
    if not preds:
        raise ValueError("no predictions to score")
    if metric == "exact_match":
        return 100.0 * _mean(exact_match(p, r) for p, r in zip(preds, refs))
    if metric == "vqa":
        return 100.0 * _mean(vqa_accuracy(p, r) for p, r in zip(preds, refs))
    if metric == "bleu4":
        return 100.0 * bleu4(preds, refs)
    return 100.0 * cider_d(preds, refs)
