"""Placeholder expansion, label masking, truncation; the tiny word tokenizer."""

from __future__ import annotations

import pytest
from fake_plugins import plugins

from mil_plugins.data import (IGNORE_INDEX, DataError, Sample, add_placeholder_tokens,
                              build_word_tokenizer, encode_for_generation, encode_for_training,
                              get_template, placeholder_tokens)
from mil_plugins.data.tokenize import encode_answer

TEXTS = ["what is it compare hear see a red circle same long " + " ".join(f"w{i}" for i in range(40)),
         get_template("v1").literal_text, get_template("qa").literal_text]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TEXTS, ["<vec>", "<snd>"])


@pytest.fixture(scope="module")
def ph(tok):
    return placeholder_tokens(tok, plugins(), {"vec": 3, "snd": 2})


def sample(*turns, sid="s1"):
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]
    return Sample(id=sid, conversations=conv, media={}, manifest="m.json", index=7)


def runs(ids, token):
    """Lengths of the consecutive runs of ``token``."""
    out, n = [], 0
    for i in ids + [None]:
        if i == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def targets(tok, enc):
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


# -- tiny tokenizer ---------------------------------------------------------------------------------
def test_tiny_tokenizer_basics(tok, tmp_path):
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = tok.encode("a red circle", add_special_tokens=False)
    assert len(ids) == 3 and tok.decode(ids) == "a red circle"
    ids = tok.encode("<vec>\nsame</s>", add_special_tokens=False)
    assert ids == [tok.convert_tokens_to_ids("<vec>"), tok.convert_tokens_to_ids("same"), 3]
    assert tok.encode("circle?", add_special_tokens=False)[-1] == tok.unk_token_id  # '?' unseen
    assert tok.decode(tok.encode("USER: same", add_special_tokens=False)) == "USER : same"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "<snd> a red circle</s>"
    assert back.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert back.padding_side == "right" and back.eos_token_id == 3
    left = build_word_tokenizer(["x"], ["<vec>"], padding_side="left")
    assert left.padding_side == "left"


def test_placeholder_helpers(tok, ph):
    assert ph == {"<vec>": (4, 3), "<snd>": (5, 2)}
    plain = build_word_tokenizer(["a"])
    with pytest.raises(ValueError, match="not a single token"):
        placeholder_tokens(plain, plugins(), {"vec": 1, "snd": 1})
    assert add_placeholder_tokens(plain, ["<vec>", "<snd>"]) == 2
    assert placeholder_tokens(plain, plugins(), {"vec": 1, "snd": 1})["<snd>"][1] == 1
    assert add_placeholder_tokens(plain, ["<vec>"]) == 0


# -- encoding -----------------------------------------------------------------------------------------
def test_expansion_and_masking_several_modalities(tok, ph):
    s = sample("<vec> <snd> <vec> compare", "same")
    enc = encode_for_training(s, tok, "v1", ph, max_length=None)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
    assert runs(ids, 4) == [3, 3] and runs(ids, 5) == [2]
    order = [i for k, i in enumerate(ids) if i in (4, 5) and (k == 0 or ids[k - 1] != i)]
    assert order == [4, 5, 4]
    # only the answer and its </s> are targets: not BOS, system prompt, USER turn, media tokens
    assert targets(tok, enc) == "same </s>"
    first_target = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tok.decode(ids[1:first_target]).endswith("USER : <vec> <vec> <vec> <snd> <snd> <vec> "
                                                   "<vec> <vec> compare ASSISTANT :")
    assert all(labels[k] == IGNORE_INDEX for k, i in enumerate(ids) if i in (4, 5))


def test_multi_turn_targets_and_text_only(tok, ph):
    enc = encode_for_training(sample("what is it", "a red", "see", "circle"), tok, "v1", ph, None)
    assert targets(tok, enc) == "a red </s> circle </s>"
    assert 4 not in enc["input_ids"] and 5 not in enc["input_ids"]


def test_plain_template_masks_media_and_targets_answer(tok, ph):
    enc = encode_for_training(sample("<vec>\nwhat is it", "a red circle"), tok, "plain", ph, None)
    assert enc["input_ids"] == [2, 4, 4, 4] + tok.encode("a red circle", add_special_tokens=False)
    assert enc["labels"][:4] == [IGNORE_INDEX] * 4 and targets(tok, enc) == "a red circle"


def test_generation_prompt_matches_training_context(tok, ph):
    s = sample("<vec> what is it", "a red", "<snd> see", "circle")
    train = encode_for_training(s, tok, "v1", ph, None)
    gen = encode_for_generation(s, tok, "v1", ph, None)
    assert gen["answer"] == "circle"
    n = len(gen["input_ids"])
    assert train["input_ids"][:n] == gen["input_ids"]
    assert train["labels"][n] != IGNORE_INDEX and tok.decode(gen["input_ids"][-2:]) == "ASSISTANT :"
    assert runs(gen["input_ids"], 4) == [3] and runs(gen["input_ids"], 5) == [2]
    with pytest.raises(DataError, match=r"m\.json: sample 's1' \(index 7\): the generation prompt is"):
        encode_for_generation(s, tok, "v1", ph, max_length=5)


@pytest.mark.parametrize("template", ["v1", "qa", "plain"])
def test_an_answers_tokens_are_what_training_puts_after_the_prompt(tok, ph, template, monkeypatch):
    s = sample("<vec> what is it", "a red circle") if template == "plain" else \
        sample("<vec> what is it", "a red", "<snd> see", "circle")
    gen = encode_for_generation(s, tok, template, ph, None)["input_ids"]
    train = encode_for_training(s, tok, template, ph, None)
    ref = encode_answer(s, gen_answer(s), tok, template, ph)
    assert gen + ref == train["input_ids"]
    assert ref == [i for i, lab in zip(train["input_ids"], train["labels"]) if lab != IGNORE_INDEX][-len(ref):]
    other = encode_answer(s, "same long", tok, template, ph)
    assert other != ref and tok.decode(other).startswith("same long")
    if template != "plain":  # (plain's separator is a newline, no token of a word tokenizer)
        assert other[-1] == ref[-1] == tok.eos_token_id  # the separator is scored too
    import mil_plugins.data.tokenize as T

    real = T.encode_for_generation
    monkeypatch.setattr(T, "encode_for_generation",
                        lambda *a: {**real(*a), "input_ids": real(*a)["input_ids"][:-1] + [0]})
    with pytest.raises(DataError, match=r"m\.json: sample 's1' \(index 7\): the prompt tokenises "
                                        r"differently when the answer 'same' follows"):
        encode_answer(s, "same", tok, template, ph)


def gen_answer(s):
    return s.conversations[-1]["value"]


def test_truncation_never_splits_a_run_nor_drops_media(tok, ph):
    long_answer = " ".join(f"w{i}" for i in range(30))
    s = sample("<vec> <snd> compare", long_answer)
    full = encode_for_training(s, tok, "qa", ph, None)["input_ids"]
    media_end = max(k for k, i in enumerate(full) if i in (4, 5)) + 1
    for max_length in range(1, len(full) + 1):
        try:
            enc = encode_for_training(s, tok, "qa", ph, max_length, on_overflow="truncate")
        except DataError as exc:
            assert "sample 's1'" in str(exc)
            assert ("media do not fit" in str(exc)) == (max_length < media_end)
            continue
        ids = enc["input_ids"]
        assert len(ids) == max_length and ids == full[:max_length]
        assert runs(ids, 4) == [3] and runs(ids, 5) == [2]
        assert any(lab != IGNORE_INDEX for lab in enc["labels"])


def test_overflow_errors(tok, ph):
    s = sample("<vec> compare", " ".join(f"w{i}" for i in range(30)))
    with pytest.raises(DataError, match=r"m\.json: sample 's1' \(index 7\): \d+ tokens exceed "
                                        r"max_length=20"):
        encode_for_training(s, tok, "qa", ph, 20)
    with pytest.raises(DataError, match="media do not fit in max_length=3"):
        encode_for_training(s, tok, "qa", ph, 3, on_overflow="truncate")
    # media fit, but the cut falls before the answer: nothing to train on
    s = sample("<vec> " + " ".join(f"w{i}" for i in range(30)), "same")
    with pytest.raises(DataError, match="no answer token left after truncation"):
        encode_for_training(s, tok, "qa", ph, 10, on_overflow="truncate")
    with pytest.raises(ValueError, match="on_overflow"):
        encode_for_training(s, tok, "qa", ph, 10, on_overflow="drop")


def test_placeholder_in_answer_is_an_error(tok, ph):
    with pytest.raises(DataError, match=r"sample 's1'.*placeholder '<vec>' is in an answer"):
        encode_for_training(sample("what", "it is <vec>"), tok, "v1", ph, None)


def test_tokenizer_without_bos(tok, ph):
    class NoBos:
        bos_token_id = None

        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=False)

    enc = encode_for_training(sample("<vec> what", "same"), NoBos(), "plain", ph, None)
    assert enc["input_ids"][0] == 4
