"""Conversation templates render LLaVA's exact strings."""

from __future__ import annotations

import pytest

from mil_plugins.data import TEMPLATES, DataError, get_template

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ONE = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
TWO = ONE + [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Black."}]


def test_v1_single_turn_is_llava_vicuna_v1():
    t = get_template("v1")
    assert t.text(ONE) == f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    assert t.render(ONE) == [(f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:", False),
                             (" A cat.</s>", True)]


def test_v1_multi_turn_and_generation_prompt():
    t = get_template("v1")
    assert t.text(TWO) == (f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                           f"USER: Color? ASSISTANT: Black.</s>")
    targets = [text for text, is_target in t.render(TWO) if is_target]
    assert targets == [" A cat.</s>", " Black.</s>"]
    segments, answer = t.render_prompt(TWO)
    assert answer == "Black."
    # LLaVA's generation prompt: the last assistant message is None -> "ASSISTANT:"
    assert t.prompt_text(TWO) == (f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                                  f"USER: Color? ASSISTANT:")
    assert segments == t.render(TWO)[:-1]


def test_v1_conversation_system_turn_replaces_the_default():
    conv = [{"from": "system", "value": "Be terse."}] + ONE
    assert get_template("v1").text(conv) == "Be terse. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"


def test_vicuna_alias_and_llava_v1():
    assert get_template("vicuna_v1").text(ONE) == get_template("v1").text(ONE)
    assert get_template("llava_v1").text(ONE).startswith(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. USER:")


def test_plain_is_llava_pretraining_format():
    t = get_template("plain")
    # LLaVA's preprocess_plain: the human value becomes just the placeholder; sep "\n" after answer
    assert t.text(ONE, ["<image>"]) == "<image>A cat.\n"
    assert t.render(ONE, ["<image>"]) == [("<image>", False), ("A cat.\n", True)]
    segments, answer = t.render_prompt(ONE, ["<image>"])
    assert segments == [("<image>", False)] and answer == "A cat."


def test_plain_keeps_every_placeholder_in_order_and_drops_the_text():
    conv = [{"from": "human", "value": "hear <audio> then see <image> and <audio>"},
            {"from": "gpt", "value": "ok"}]
    assert get_template("plain").text(conv, ["<image>", "<audio>"]) == "<audio><image><audio>ok\n"
    text_only = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]
    assert get_template("plain").render(text_only, ["<image>"]) == [("hi\n", True)]


def test_plain_rejects_multi_turn():
    with pytest.raises(DataError, match="one human turn and one answer"):
        get_template("plain").render(TWO, ["<image>"])


def test_qa_template():
    assert get_template("qa").text(TWO) == "Q: <image>\nWhat is this? A: A cat.</s>Q: Color? A: Black.</s>"
    assert get_template("qa").prompt_text(ONE) == "Q: <image>\nWhat is this? A:"


def test_unknown_template_lists_names():
    with pytest.raises(ValueError) as err:
        get_template("vicuna")
    for name in TEMPLATES:
        assert name in str(err.value)


def test_overrides():
    t = get_template("v1", sep2="<|im_end|>")
    assert t.text(ONE).endswith("A cat.<|im_end|>") and TEMPLATES["v1"].sep2 == "</s>"
    with pytest.raises(ValueError, match="unknown template field"):
        get_template("v1", eos="x")


@pytest.mark.parametrize("conv, problem", [
    ([{"from": "human", "value": "q"}], "pairs ending with a gpt answer"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "expected human then gpt"),
])
def test_malformed_conversations(conv, problem):
    with pytest.raises(DataError, match=problem):
        get_template("v1").render(conv)
