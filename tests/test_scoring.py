"""Answer scoring: normalisation, exact match and VQA accuracy (ours), BLEU-4 and CIDEr-D
(pycocoevalcap on our tokens)."""

import math

import pytest

from mil_plugins import scoring as S

approx = pytest.approx


@pytest.mark.parametrize("raw, norm", [
    ("The Cat", "cat"),
    ("  an   apple. ", "apple"),
    ("A dog, running!", "dog running"),
    ("Two", "2"),
    ("ten birds", "10 birds"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("U.S.A.", "usa"),
    ("don't", "dont"),
    ("black-and-white", "black and white"),
    ("yes.", "yes"),
    ("Theater", "theater"),  # "the" only as a whole word
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert S.normalize_answer(raw) == norm


def test_exact_match():
    assert S.exact_match("The cat.", "cat") == 1.0
    assert S.exact_match("cat", "dog") == 0.0
    assert S.exact_match("two", ["dog", "2"]) == 1.0  # any reference
    assert S.exact_match("three", ["dog", "2"]) == 0.0
    with pytest.raises(ValueError):
        S.exact_match("x", [])


def test_vqa_accuracy():
    refs = ["yes", "yes", "no", "Yes.", "no"]
    assert S.vqa_accuracy("yes", refs) == 1.0  # 3 matches
    assert S.vqa_accuracy("no", refs) == approx(2 / 3)
    assert S.vqa_accuracy("maybe", refs) == 0.0
    assert S.vqa_accuracy("yes", "yes") == approx(1 / 3)


def test_bleu4_identical_and_disjoint():
    s = "a man is riding a horse on the beach"
    assert S.bleu4([s], [[s]]) == approx(1.0)
    assert S.score("bleu4", [s], [s]) == approx(100.0)
    assert S.bleu4(["x y z w"], [["a b c d"]]) < 1e-12      # coco-caption's 1e-15 guard, not 0
    assert S.score("bleu4", ["x y z w"], ["a b c d"]) < 1e-9
    assert S.bleu4([""], [["a b c d"]]) == 0.0


def test_bleu4_partial_by_hand():
    hyp = "the quick brown fox jumps over the dog"        # 8 tokens
    ref = "the quick brown fox jumps over the lazy dog"   # 9 tokens
    # p1 = 8/8; p2 = 6/7 ("the dog" unmatched); p3 = 5/6 ("over the dog"); p4 = 4/5 ("jumps over the dog")
    # BP = exp(1 - 9/8);  BLEU = BP * (1 * 6/7 * 5/6 * 4/5) ** (1/4) = exp(-1/8) * (4/7) ** 0.25
    expected = math.exp(-1 / 8) * (4 / 7) ** 0.25
    assert expected == approx(0.767280, abs=1e-6)
    assert S.bleu4([hyp], [[ref]]) == approx(expected)


def test_bleu4_no_smoothing():
    # clipped matches: 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3: coco-caption does not
    # smooth, so a sentence with no 4-gram match scores ~0
    assert S.bleu4(["the cat sat on the mat"], ["the cat is on the mat"]) < 1e-3


def test_bleu4_corpus_pools_counts():
    preds = ["the quick brown fox jumps over the dog", "the cat sat on the mat"]
    refs = [["the quick brown fox jumps over the lazy dog"], ["the cat is on the mat"]]
    # pooled: p1 = 13/14, p2 = 9/12, p3 = 6/10, p4 = 4/8; c = 14, r = 15 -> BP = exp(1 - 15/14)
    expected = math.exp(1 - 15 / 14) * (13 / 14 * 9 / 12 * 6 / 10 * 4 / 8) ** 0.25
    assert S.bleu4(preds, refs) == approx(expected)
    # the closest reference length is used for the brevity penalty
    assert S.bleu4([preds[0]], [[refs[0][0], "the quick brown fox jumps over the dog"]]) == approx(1.0)


CAPTION_REFS = [
    ["a man rides a horse on the beach", "a person riding a horse along the shore"],
    ["a plate with broccoli and rice", "food on a white plate"],
    ["two dogs play in snow", "dogs running through the snow"],
]


def test_cider_d():
    good = S.cider_d([r[0] for r in CAPTION_REFS], CAPTION_REFS)
    close = S.cider_d(["a man riding a horse on a beach", "a plate of food with broccoli",
                       "two dogs playing in the snow"], CAPTION_REFS)
    wrong = S.cider_d(["a red car parked on a street", "a cat sleeping on a sofa",
                       "an airplane in the sky"], CAPTION_REFS)
    assert good > close > wrong >= 0.0
    assert close > 0.0
    assert S.score("cider", [r[0] for r in CAPTION_REFS], CAPTION_REFS) == approx(100 * good)
    # one example: every IDF weight is log(1) - log(1) = 0
    assert S.cider_d(["a cat"], [["a cat"]]) == 0.0


# A fixed set with case, punctuation and several references, scored by pycocoevalcap directly on
# the sentences our tokenizer produces (its PTB tokenizer needs Java, so neither side runs it).
COCO_PREDS = ["A man riding a horse on the beach.", "A plate of food, with broccoli and rice!",
              "Two dogs running through the snow", "a red car parked on a street", "an airplane"]
COCO_REFS = [["a man rides a horse on the beach", "A person riding a horse along the shore."],
             ["a plate with broccoli and rice", "Food on a white plate"],
             ["two dogs play in snow", "Dogs running through the snow."],
             ["a red car on the street", "a parked red car"],
             ["an airplane flying in the blue sky", "a plane in the sky", "a jet"]]


def _coco(scorer):
    gts = {i: [" ".join(S.tokenize(r)) for r in refs] for i, refs in enumerate(COCO_REFS)}
    res = {i: [" ".join(S.tokenize(p))] for i, p in enumerate(COCO_PREDS)}
    return scorer.compute_score(gts, res, **({"verbose": 0} if "verbose" in
                                             scorer.compute_score.__code__.co_varnames else {}))[0]


def test_scores_equal_pycocoevalcap_on_a_fixed_set():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    bleu, cider = _coco(Bleu(4))[3], _coco(Cider())
    assert 0.1 < bleu < 1.0 and 0.1 < cider < 10.0  # a set where every order has matches
    assert S.score("bleu4", COCO_PREDS, COCO_REFS) == approx(100 * bleu, rel=1e-12)
    assert S.score("cider", COCO_PREDS, COCO_REFS) == approx(100 * cider, rel=1e-12)
    # tokenisation is ours: case and punctuation do not change a score
    lowered = [" ".join(S.tokenize(p)) for p in COCO_PREDS]
    assert S.score("cider", lowered, COCO_REFS) == approx(S.score("cider", COCO_PREDS, COCO_REFS))


def test_score_percentages():
    preds, refs = ["The cat", "dog", "2"], ["cat", ["a cat", "puppy"], ["two"]]
    assert S.score("exact_match", preds, refs) == approx(200 / 3)
    assert S.score("vqa", ["yes", "no"], [["yes"] * 3, ["no", "yes", "yes"]]) == approx(100 * (1 + 1 / 3) / 2)
    assert set(S.METRICS) == {"exact_match", "vqa", "bleu4", "cider"}


def test_score_errors():
    with pytest.raises(ValueError) as e:
        S.score("rouge", ["a"], ["a"])
    for name in S.METRICS:
        assert name in str(e.value)
    with pytest.raises(ValueError):
        S.score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError):
        S.score("exact_match", [], [])
