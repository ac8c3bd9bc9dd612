"""Our conversation templates against LLaVA's own (the real ``llava`` package): the prompt strings
of every template in ``llava.conversation.conv_templates``, and the token ids and label masks of
LLaVA's training preprocessing (``preprocess_v1``, ``preprocess_plain``, ``preprocess_llama_2``)
with a LLaMA-style tokenizer."""

from __future__ import annotations

import copy

import llava.conversation as conversation
import pytest
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token

from _llava_fixtures import llama_tokenizer, llava_preprocess
from mil_plugins.data import get_template
from mil_plugins.data.templates import LLAVA_TEMPLATE_NAMES, TEMPLATES
from mil_plugins.data.tokenize import encode_for_generation, encode_for_training

ONE = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
       {"from": "gpt", "value": "A black cat."}]
TWO = ONE + [{"from": "human", "value": "And its color? Tell me"},
             {"from": "gpt", "value": "Black and white."}]
TEXT_ONLY = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there."},
             {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Hello."}]
IMAGE = {"<image>": (IMAGE_TOKEN_INDEX, 1)}   # LLaVA's convention: one -200 per <image>


def _llava_conv(name: str, turns: list[dict], generation: bool = False):
    conv = conversation.conv_templates[name].copy()
    conv.messages = []  # v0's worked example is for chat demos, not for training
    wrap = "mmtag" in name
    for i, turn in enumerate(turns):
        value = turn["value"]
        if wrap and turn["from"] == "human":  # what LLaVA's preprocess_multimodal does for mmtag
            value = value.replace("<image>", "<Image><image></Image>")
        conv.append_message(conv.roles[i % 2], value)
    if generation:
        conv.messages[-1][1] = None
    return conv


def test_every_llava_template_name_is_ours():
    assert set(LLAVA_TEMPLATE_NAMES) == set(conversation.conv_templates)
    assert set(LLAVA_TEMPLATE_NAMES) <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(set(conversation.conv_templates) - {"plain", "v0_plain"}))
@pytest.mark.parametrize("turns", [ONE, TWO, TEXT_ONLY], ids=["one", "two", "text"])
def test_prompt_strings_equal_get_prompt(name, turns):
    ours = get_template(name)
    assert ours.text(turns, ["<image>"]) == _llava_conv(name, turns).get_prompt()
    assert ours.prompt_text(turns, ["<image>"]) == _llava_conv(name, turns, True).get_prompt()


def test_a_recipe_can_name_any_llava_template(tmp_path):
    from pathlib import Path

    from mil_plugins.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    for name in ("llava_llama_2", "chatml_direct", "v1_mmtag"):
        recipe = load_recipe(root / "recipes" / "quickstart.yaml", [f"model.template={name}"])
        assert get_template(recipe["model"]["template"]) is TEMPLATES[name]


@pytest.fixture(scope="module", params=[False, True], ids=["legacy=False", "legacy=True"])
def tok(request):
    texts = [get_template(n).text(c, ["<image>"]) for n in ("v1", "llava_v1", "llama_2", "llava_llama_2")
             for c in (ONE, TWO, TEXT_ONLY)] * 10
    return llama_tokenizer(texts, legacy=request.param)


@pytest.mark.parametrize("name", ["vicuna_v1", "v1", "llava_v1"])
@pytest.mark.parametrize("turns", [ONE, TWO], ids=["one", "two"])
def test_v1_ids_and_labels_equal_llava_preprocess_v1(tok, name, turns, monkeypatch, capsys):
    train = llava_preprocess()
    monkeypatch.setattr(conversation, "default_conversation", conversation.conv_templates[name])
    ref = train.preprocess_v1([copy.deepcopy(turns)], tok, has_image=True)
    ours = encode_for_training({"conversations": turns}, tok, name, IMAGE, None)
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    if "tokenization mismatch" in capsys.readouterr().out:
        # LLaVA's length arithmetic assumes its own tokenizer's quirks: for a non-legacy LLaMA
        # tokenizer after the first round it is off by one and masks the whole sample. Ours
        # labels the answers.
        assert not tok.legacy and turns is TWO
        labelled = tok.decode([i for i in ours["labels"] if i != -100])
        assert labelled == "A black cat.</s> Black and white.</s>"
    else:
        assert ours["labels"] == ref["labels"][0].tolist()
    gen = encode_for_generation({"conversations": turns}, tok, name, IMAGE, None)
    prompt = _llava_conv(name, turns, generation=True).get_prompt()
    assert gen["input_ids"] == tokenizer_image_token(prompt, tok)


@pytest.mark.parametrize("name", ["llama_2", "llava_llama_2"])
@pytest.mark.parametrize("turns", [ONE, TWO], ids=["one", "two"])
def test_llama_2_ids_and_labels_equal_llava_preprocess_llama_2(tok, name, turns, monkeypatch):
    train = llava_preprocess()
    monkeypatch.setattr(conversation, "default_conversation", conversation.conv_templates[name])
    ref = train.preprocess_llama_2([copy.deepcopy(turns)], tok, has_image=True)
    ours = encode_for_training({"conversations": turns}, tok, name, IMAGE, None)
    assert ours["input_ids"] == ref["input_ids"][0].tolist()
    assert ours["labels"] == ref["labels"][0].tolist()


def test_plain_ids_and_labels_equal_llava_preprocess_plain(tok, monkeypatch):
    train = llava_preprocess()
    monkeypatch.setattr(conversation, "default_conversation", conversation.conv_templates["plain"])
    ref = train.preprocess_plain([copy.deepcopy(ONE[:2])], tok)
    for name in ("plain", "v0_plain"):
        ours = encode_for_training({"conversations": ONE[:2]}, tok, name, IMAGE, None)
        assert ours["input_ids"] == ref["input_ids"][0].tolist()
        assert ours["labels"] == ref["labels"][0].tolist()


def test_multi_modality_prompt_keeps_llava_tokens_around_each_placeholder(tok):
    """With another placeholder index beside LLaVA's, the text chunks tokenise as LLaVA's
    tokenizer_image_token tokenises them around <image>."""
    turns = [{"from": "human", "value": "<image>\nListen: <audio>\nWhat is it?"},
             {"from": "gpt", "value": "A cat."}]
    ours = encode_for_training({"conversations": turns}, tok, "v1",
                               {**IMAGE, "<audio>": (-201, 1)}, None)
    as_image = _llava_conv("v1", [{"from": "human", "value": turns[0]["value"].replace("<audio>", "<image>")},
                                  turns[1]]).get_prompt()
    ref = tokenizer_image_token(as_image, tok)
    i = [k for k, t in enumerate(ref) if t == IMAGE_TOKEN_INDEX][1]
    ref[i] = -201
    assert ours["input_ids"] == ref
