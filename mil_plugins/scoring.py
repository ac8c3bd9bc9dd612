"""Answer scoring: exact match, VQA accuracy, BLEU-4 and CIDEr-D, written out here (no nltk,
no pycocoevalcap, no Java tokenizer).

``score(metric, preds, refs)`` is what evaluation calls; it returns a percentage:

    exact_match  100 x mean over examples of exact_match(pred, refs)      (normalised strings)
    vqa          100 x mean over examples of min(1, #refs equal to pred / 3)
    bleu4        100 x corpus BLEU-4, NLTK ``corpus_bleu`` with ``SmoothingFunction().method1``
                 (epsilon = 0.1 added to the numerator of an n-gram order with no match)
    cider        100 x CIDEr-D (the original x10 scale, so a caption scoring CIDEr-D 1.2 gives 120;
                 unlike the others this is *not* bounded by 100)

Two kinds of text processing:

* :func:`normalize_answer` (exact match, VQA): lowercase; ``,`` between digits and ``.`` / ``'``
  removed ("1,000" -> "1000", "u.s." -> "us", "don't" -> "dont"), a decimal point between
  digits kept ("3.5"); every other punctuation character becomes a space; the number words
  zero..ten become digits (as VQA does); the articles a / an / the are dropped; whitespace is
  collapsed. SQuAD's normaliser plus VQA's number mapping and decimal handling.
* :func:`tokenize` (BLEU, CIDEr): the same punctuation handling and lowercasing, but articles and
  number words are kept (they matter in captions); the coco-caption PTB tokenizer also lowercases
  and drops punctuation.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

__all__ = [
    "METRICS",
    "normalize_answer",
    "tokenize",
    "exact_match",
    "vqa_accuracy",
    "bleu4",
    "sentence_bleu4",
    "sentence_bleu4_average",
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


# --------------------------------------------------------------------------------------- BLEU


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_sentence_stats(hyp: list[str], refs: list[list[str]], max_n: int):
    """Clipped n-gram matches and counts per order (NLTK ``modified_precision``: the count is
    ``max(1, #hyp n-grams)``), and the reference length closest to the hypothesis length
    (ties -> the shorter reference)."""
    numer, denom = [], []
    for n in range(1, max_n + 1):
        counts = _ngram_counts(hyp, n)
        max_ref: Counter = Counter()
        for ref in refs:
            for ng, c in _ngram_counts(ref, n).items():
                if c > max_ref[ng]:
                    max_ref[ng] = c
        numer.append(sum(min(c, max_ref[ng]) for ng, c in counts.items()))
        denom.append(max(1, sum(counts.values())))
    closest = min((len(r) for r in refs), key=lambda rl: (abs(rl - len(hyp)), rl))
    return numer, denom, len(hyp), closest


def _bleu_from_stats(numer: list[int], denom: list[int], hyp_len: int, ref_len: int,
                     smoothing: str, epsilon: float) -> float:
    if numer[0] == 0:  # no unigram match anywhere: NLTK returns 0 whatever the smoothing
        return 0.0
    precisions = []
    for k, (m, d) in enumerate(zip(numer, denom)):
        if smoothing == "epsilon":
            precisions.append((m + epsilon) / d if m == 0 else m / d)
        elif smoothing == "add1":
            precisions.append(m / d if k == 0 else (m + 1) / (d + 1))
        elif smoothing == "none":
            if m == 0:
                return 0.0
            precisions.append(m / d)
        else:
            raise ValueError(f"unknown BLEU smoothing {smoothing!r}; valid: 'epsilon', 'add1', 'none'")
    if hyp_len == 0:
        bp = 0.0
    elif hyp_len > ref_len:
        bp = 1.0
    else:
        bp = math.exp(1.0 - ref_len / hyp_len)
    w = 1.0 / len(precisions)
    return bp * math.exp(sum(w * math.log(p) for p in precisions))


def _check_pairs(preds: Sequence[str], refs_list: Sequence) -> None:
    if isinstance(preds, str):
        raise TypeError("preds must be a list of strings, not one string")
    if len(preds) != len(refs_list):
        raise ValueError(f"{len(preds)} predictions but {len(refs_list)} reference entries")


def bleu4(preds: Sequence[str], refs_list: Sequence[str | Sequence[str]],
          smoothing: str = "epsilon", epsilon: float = 0.1) -> float:
    """Corpus BLEU-4 in [0, 1] (Papineni et al. 2002), as NLTK's ``corpus_bleu``.

    p_n = Σ_sentences clipped n-gram matches / Σ_sentences max(1, #hyp n-grams), n = 1..4;
    BP = 1 if c > r else exp(1 − r/c), c = total hypothesis length, r = Σ reference length
    closest to each hypothesis; BLEU = BP · exp(Σ_n ¼ log p_n); 0 if no unigram matches.

    ``smoothing``: ``"epsilon"`` (default; NLTK method1: an order with 0 matches gets
    p_n = ε / count, ε = 0.1), ``"add1"`` (Lin & Och 2004, NLTK method2: p_n = (m+1)/(count+1)
    for n ≥ 2) or ``"none"`` (any order with no match gives 0).
    """
    _check_pairs(preds, refs_list)
    if not preds:
        raise ValueError("no predictions to score")
    numer, denom = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for pred, refs in zip(preds, refs_list):
        m, d, h, r = _bleu_sentence_stats(tokenize(pred), [tokenize(x) for x in _as_refs(refs)], 4)
        numer = [a + b for a, b in zip(numer, m)]
        denom = [a + b for a, b in zip(denom, d)]
        hyp_len += h
        ref_len += r
    return _bleu_from_stats(numer, denom, hyp_len, ref_len, smoothing, epsilon)


def sentence_bleu4(pred: str, refs: str | Sequence[str], smoothing: str = "add1",
                   epsilon: float = 0.1) -> float:
    """BLEU-4 of one sentence in [0, 1], add-one smoothed by default (for short answers, where
    most sentences have no 3- or 4-gram match and unsmoothed BLEU would be 0)."""
    m, d, h, r = _bleu_sentence_stats(tokenize(pred), [tokenize(x) for x in _as_refs(refs)], 4)
    return _bleu_from_stats(m, d, h, r, smoothing, epsilon)


def sentence_bleu4_average(preds: Sequence[str], refs_list: Sequence[str | Sequence[str]],
                           smoothing: str = "add1") -> float:
    """Mean of :func:`sentence_bleu4` over examples, in [0, 1]. Not what :func:`score` uses."""
    _check_pairs(preds, refs_list)
    if not preds:
        raise ValueError("no predictions to score")
    return sum(sentence_bleu4(p, r, smoothing) for p, r in zip(preds, refs_list)) / len(preds)


# ------------------------------------------------------------------------------------ CIDEr-D


def _all_ngrams(tokens: list[str], max_n: int) -> Counter:
    c: Counter = Counter()
    for n in range(1, max_n + 1):
        c.update(_ngram_counts(tokens, n))
    return c


def cider_d(preds: Sequence[str], refs_list: Sequence[str | Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, the coco-caption ``CiderD`` scorer, ``df="corpus"``).

    For each n-gram order n = 1..4, every sentence becomes a TF-IDF vector
    g(w) = tf(w) · (log N − log max(1, df(w))), N = number of examples, df(w) = number of
    examples whose references contain w. Per example and reference,
    s_n = Σ_w min(g_c(w), g_r(w)) · g_r(w) / (‖g_c‖ ‖g_r‖) · exp(−(ℓ_c − ℓ_r)² / 2σ²)
    (clipped cosine with a Gaussian length penalty, σ = 6; ℓ is counted as the original does,
    in bigrams). CIDEr-D of an example = 10 · mean_n (mean_refs s_n); the result is the mean
    over examples. With a single example every IDF is 0, so the score is 0.
    """
    _check_pairs(preds, refs_list)
    if not preds:
        raise ValueError("no predictions to score")
    crefs = [[_all_ngrams(tokenize(r), n) for r in _as_refs(refs)] for refs in refs_list]
    ctest = [_all_ngrams(tokenize(p), n) for p in preds]

    df: Counter = Counter()
    for refs in crefs:
        df.update(set(ng for ref in refs for ng in ref))
    log_n = math.log(float(len(crefs)))

    def vectorize(cnts: Counter):
        vec: list[dict] = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ng, tf in cnts.items():
            k = len(ng) - 1
            w = float(tf) * (log_n - math.log(max(1.0, float(df.get(ng, 0)))))
            vec[k][ng] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def sim(vh, nh, lh, vr, nr, lr) -> list[float]:
        penalty = math.exp(-(float(lh - lr) ** 2) / (2 * sigma ** 2))
        val = [0.0] * n
        for k in range(n):
            for ng, w in vh[k].items():
                wr = vr[k].get(ng, 0.0)
                val[k] += min(w, wr) * wr
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= penalty
        return val

    per_example = []
    for test, refs in zip(ctest, crefs):
        vh, nh, lh = vectorize(test)
        total = [0.0] * n
        for ref in refs:
            total = [a + b for a, b in zip(total, sim(vh, nh, lh, *vectorize(ref)))]
        per_example.append(sum(total) / n / len(refs) * 10.0)
    return sum(per_example) / len(per_example)


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
