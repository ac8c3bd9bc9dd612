"""Our modalities inside LLaVA's own model class (the real ``llava`` package): a tiny
``LlavaLlamaForCausalLM`` (config-built Llama + CLIP tower) learns audio beside its images."""

from __future__ import annotations

import copy

import pytest
import torch

from _llava_fixtures import save_tiny_clip_tower, tiny_llava_llama
from _model_fixtures import make_tokenizer, one_thread
from mil_plugins.integrations.llava_fork.modalities import (MultiModalityMixin, add_modalities,
                                                            placeholder_indices)
from mil_plugins.integrations.llava_fork.tokens import IMAGE_TOKEN_INDEX, tokenizer_multimodal_token

AUDIO = {"hidden_size": 32, "layers": 1, "heads": 2}   # tiny audio encoder: [32 mels, 100 frames] -> [10, 32]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = make_tokenizer()
    tower = save_tiny_clip_tower(tmp_path_factory.mktemp("tower"))
    reference = tiny_llava_llama(tok, tower)
    return tok, reference


@pytest.fixture
def fork(parts):
    tok, reference = parts
    model = copy.deepcopy(reference)
    torch.manual_seed(1)
    add_modalities(model, {"audio": AUDIO})
    return model


def _media(n_images=0, n_audio=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_images, 3, 32, 32, generator=g), torch.randn(n_audio, 32, 100, generator=g))


def _batch(tok, model, prompts, answers=None, left=False):
    idx = placeholder_indices(model)
    rows = [tokenizer_multimodal_token(p, tok, idx) for p in prompts]
    labs = None
    if answers is not None:
        labs = []
        for i, a in enumerate(answers):
            ans = tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
            labs.append([-100] * len(rows[i]) + ans)
            rows[i] = rows[i] + ans
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
        if labs is not None:
            labels[i, span] = torch.tensor(labs[i])
    return ids, mask, (labels if labs is not None else None)


def test_indices_and_config(fork, parts):
    tok, _ = parts
    assert placeholder_indices(fork) == {"<image>": -200, "<audio>": -201}
    entry = fork.config.mil_modalities["audio"]
    assert entry["index"] == -201 and entry["projector_type"] == "mlp2x_gelu"
    assert entry["mm_hidden_size"] == 32 and entry["num_tokens"] == 10
    names = {n for n, _ in fork.named_parameters()}
    assert {"model.mil_projectors.audio.0.weight", "model.mil_projectors.audio.2.bias"} <= names
    assert not any(p.requires_grad for p in fork.get_model().mil_encoders.parameters())
    ids = tokenizer_multimodal_token("<image>\nwhat is it ? <audio> say", tok, placeholder_indices(fork))
    from llava.mm_utils import tokenizer_image_token
    assert tokenizer_multimodal_token("<image>\nwhat is it ?", tok, {"<image>": -200}) == \
        tokenizer_image_token("<image>\nwhat is it ?", tok)
    assert ids.count(-200) == 1 and ids.count(-201) == 1


def test_image_only_batches_are_bit_identical_to_the_unmodified_model(fork, parts):
    tok, reference = parts
    images, _ = _media(n_images=2)
    ids, mask, labels = _batch(tok, fork, ["<image>\nwhat is it ?", "what is <image> ?"],
                               ["cat", "red dog"])
    text_ids, text_mask, text_labels = _batch(tok, fork, ["say hello world"], ["hello"])
    fork.eval()
    with torch.no_grad():
        for imgs in (images, {"image": images}, list(images)):
            got = fork(input_ids=ids, attention_mask=mask, labels=labels, images=imgs)
            ref = reference(input_ids=ids, attention_mask=mask, labels=labels, images=images)
            assert torch.equal(got.logits, ref.logits) and torch.equal(got.loss, ref.loss)
        got = fork(input_ids=text_ids, attention_mask=text_mask, labels=text_labels)
        ref = reference(input_ids=text_ids, attention_mask=text_mask, labels=text_labels)
        assert torch.equal(got.logits, ref.logits)
    # with autograd on (training): same loss, same gradients on LLaVA's projector
    fork.train(), reference.train()
    losses, grads = [], []
    for m, imgs in ((fork, {"image": images}), (reference, images)):
        m.zero_grad()
        loss = m(input_ids=ids, attention_mask=mask, labels=labels, images=imgs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.get_model().mm_projector[0].weight.grad.clone())
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    fork.eval(), reference.eval()
    p_ids, p_mask, _ = _batch(tok, fork, ["<image>\nwhat is it ?"])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(fork.generate(p_ids, attention_mask=p_mask, images={"image": images[:1]}, **kw),
                       reference.generate(p_ids, attention_mask=p_mask, images=images[:1], **kw))
    t_ids, t_mask, _ = _batch(tok, fork, ["say hello"])
    assert torch.equal(fork.generate(t_ids, attention_mask=t_mask, images={}, **kw),
                       reference.generate(t_ids, attention_mask=t_mask, **kw))
    with torch.no_grad():
        assert torch.equal(fork(input_ids=text_ids, attention_mask=text_mask, images={}).logits,
                           reference(input_ids=text_ids, attention_mask=text_mask).logits)


def test_features_land_at_their_indices(fork, parts):
    tok, _ = parts
    images, audio = _media(n_images=1, n_audio=2)
    ids, mask, labels = _batch(tok, fork, ["<audio> what is it ?", "<image>\nhear <audio> ?"],
                               ["cat", "dog"])
    with torch.no_grad():
        _, pos, new_mask, _, embeds, new_labels = fork.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, labels, {"image": images, "audio": audio})
        inner = fork.get_model()
        audio_feats = inner.mil_projectors["audio"](inner.mil_encoders["audio"](audio))
        image_feats = fork.encode_images(images)
        text = inner.embed_tokens
    n_img, n_aud = image_feats.shape[1], audio_feats.shape[1]
    row0, row1 = ids[0][mask[0].bool()], ids[1][mask[1].bool()]
    # row 0: <audio> then text
    assert torch.equal(embeds[0, :n_aud], audio_feats[0])
    assert torch.equal(embeds[0, n_aud:n_aud + len(row0) - 1], text(row0[1:]))
    # row 1: BOS, <image>, "\nhear" ..., <audio>, rest
    i_img = int((row1 == IMAGE_TOKEN_INDEX).nonzero())
    i_aud = int((row1 == -201).nonzero())
    assert torch.equal(embeds[1, i_img:i_img + n_img], image_feats[0])
    at = i_aud - 1 + n_img
    assert torch.equal(embeds[1, at:at + n_aud], audio_feats[1])
    assert (new_labels[0, :n_aud] == -100).all() and (new_labels[1, at:at + n_aud] == -100).all()
    assert int(new_mask[1].sum()) == len(row1) - 2 + n_img + n_aud
    assert pos is None


def test_image_and_audio_in_one_batch_train_a_step_and_generate(fork, parts):
    tok, _ = parts
    images, audio = _media(n_images=2, n_audio=2, seed=3)
    prompts = ["<image>\nwhat is it ?", "<audio> what is it ?", "<image>\nand <audio> ?"]
    ids, mask, labels = _batch(tok, fork, prompts, ["cat", "dog", "red cat"])
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels,
                 images={"image": images, "audio": audio})
    fork.train()
    trainable = [p for n, p in fork.named_parameters() if "mm_projector" in n or "mil_projectors" in n]
    for p in fork.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    loss0 = fork(**batch).loss
    loss0.backward()
    proj = fork.get_model().mil_projectors["audio"]
    assert proj[0].weight.grad is not None and proj[0].weight.grad.abs().sum() > 0
    assert fork.get_model().mm_projector[0].weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss1 = fork(**batch).loss
    assert torch.isfinite(loss0) and loss1 < loss0

    fork.eval()
    fork.config.tokenizer_padding_side = "left"   # batched generation pads on the left
    p_ids, p_mask, _ = _batch(tok, fork, prompts, left=True)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    out = fork.generate(p_ids, attention_mask=p_mask, images={"image": images, "audio": audio}, **kw)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 3
    one_ids, one_mask, _ = _batch(tok, fork, prompts[1:2])
    alone = fork.generate(one_ids, attention_mask=one_mask, images={"audio": audio[:1]}, **kw)
    assert torch.equal(out[1, :alone.shape[1]], alone[0])   # (then padding after EOS)


def test_llava_dummy_image_per_row_convention(fork, parts):
    """LLaVA's loader gives every text-only sample a zero image and its model consumes one per
    row without <image>: the same batch with and without those dummies gives the same logits."""
    tok, _ = parts
    images, audio = _media(n_images=1, n_audio=1)
    ids, mask, labels = _batch(tok, fork, ["<image>\nwhat ?", "<audio> what ?"], ["cat", "dog"])
    with torch.no_grad():
        plain = fork(input_ids=ids, attention_mask=mask, images={"image": images, "audio": audio})
        dummy = torch.cat([images, torch.zeros_like(images)])
        padded = fork(input_ids=ids, attention_mask=mask, images={"image": dummy, "audio": audio})
    assert torch.equal(plain.logits, padded.logits)
    with pytest.raises(ValueError, match=r"audio: 3 items for 1 placeholder indices in input_ids "
                                         r"\(expected 1, or 2 with LLaVA's one dummy"):
        fork(input_ids=ids, attention_mask=mask, images={"image": images, "audio": torch.cat([audio] * 3)})


def test_bad_input_errors(fork, parts):
    tok, _ = parts
    images, audio = _media(n_images=1, n_audio=1)
    ids, mask, _ = _batch(tok, fork, ["<audio> what ?"])
    with pytest.raises(KeyError, match="depth"):
        fork(input_ids=ids, attention_mask=mask, images={"depth": audio})
    with pytest.raises(ValueError, match="images has no 'audio' entry"):
        fork(input_ids=ids, attention_mask=mask, images={"image": images[:0]})
    fork.config.mm_patch_merge_type = "spatial_unpad"     # LLaVA-1.6 anyres image lists
    ids2, mask2, _ = _batch(tok, fork, ["<image>\nhear <audio>"])
    with pytest.raises(ValueError, match="mm_patch_merge_type='spatial_unpad'.*not supported"):
        fork(input_ids=ids2, attention_mask=mask2, images={"image": [images[0]], "audio": audio})
    with pytest.raises(ValueError, match="LLaVA's own vision tower"):
        add_modalities(fork, {"image": {}})
    with pytest.raises(ValueError, match="already has modality 'audio'"):
        add_modalities(fork, {"audio": AUDIO})
    with pytest.raises(TypeError, match="not a LLaVA model"):
        add_modalities(torch.nn.Linear(2, 2), {"audio": {}})


def test_mixin_class_equals_the_one_call(fork, parts):
    from llava.model import LlavaLlamaForCausalLM

    tok, reference = parts

    class ForkForCausalLM(MultiModalityMixin, LlavaLlamaForCausalLM):
        pass

    mixed = ForkForCausalLM(copy.deepcopy(reference.config))
    mixed.get_vision_tower().load_model()
    torch.manual_seed(1)
    add_modalities(mixed, {"audio": AUDIO})
    mixed.load_state_dict(fork.state_dict())
    mixed.eval(), fork.eval()
    images, audio = _media(n_images=1, n_audio=1)
    ids, mask, _ = _batch(tok, fork, ["<image>\nwhat ? <audio>"])
    with torch.no_grad():
        a = mixed(input_ids=ids, attention_mask=mask, images={"image": images, "audio": audio}).logits
        b = fork(input_ids=ids, attention_mask=mask, images={"image": images, "audio": audio}).logits
    assert torch.equal(a, b)
