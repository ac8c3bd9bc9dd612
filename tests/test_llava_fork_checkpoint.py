"""LLaVA-original model directories both ways, against the real ``llava`` package: adopt one that
``LlavaLlamaForCausalLM.save_pretrained`` wrote, export ours so that
``LlavaLlamaForCausalLM.from_pretrained`` loads it with no missing or unexpected keys and the
same logits, and round trips."""

from __future__ import annotations

import json

import pytest
import torch

from _llava_fixtures import save_tiny_clip_tower, tiny_llava_llama
from _model_fixtures import make_tokenizer, one_thread
from mil_plugins.integrations.llava_fork import (add_modalities, adopt_llava_dir, export_llava_dir,
                                                 load_fork_modalities, placeholder_indices,
                                                 save_fork, tokenizer_multimodal_token)

AUDIO = {"hidden_size": 32, "layers": 1, "heads": 2}   # [32 mels, 100 frames] -> [10, 32]
PROMPTS = ["<image>\nwhat is it ?", "say <audio> and <image> ?", "hello world"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A directory as LLaVA writes it: save_pretrained of a model whose tower is loaded (so the
    tower's weights are in the checkpoint too)."""
    tmp = tmp_path_factory.mktemp("llava")
    tok = make_tokenizer()
    model = tiny_llava_llama(tok, save_tiny_clip_tower(tmp / "tower"))
    model.save_pretrained(str(tmp / "llava-v1.5-tiny"))
    tok.save_pretrained(str(tmp / "llava-v1.5-tiny"))
    return tmp / "llava-v1.5-tiny"


def _load_llava(directory):
    from llava.model import LlavaLlamaForCausalLM

    model, info = LlavaLlamaForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    model.get_vision_tower().load_model()
    return model.eval(), info


def _media(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 32, 100, generator=g)


def _ours_logits(model, prompt, image, audio):
    tok = model.tokenizer
    counts = {pid: n for pid, n in model.placeholders().values()}
    ids = []
    for i in tok(prompt).input_ids:
        ids.extend([i] * counts.get(i, 1))
    media = {}
    if "<image>" in prompt:
        media["image"] = image
    if "<audio>" in prompt:
        media["audio"] = audio
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "media": media}
    with torch.no_grad():
        return model.eval()(batch).logits


def _fork_logits(fork, tok, prompt, image, audio):
    ids = tokenizer_multimodal_token(prompt, tok, placeholder_indices(fork), return_tensors="pt")[None]
    images = {}
    if "<image>" in prompt:
        images["image"] = image
    if "<audio>" in prompt:
        images["audio"] = audio
    if not getattr(fork.config, "mil_modalities", None):
        images = images.get("image")   # an unmodified LLaVA model takes LLaVA's images only
    elif not images:
        images = None
    with torch.no_grad():
        return fork(input_ids=ids, attention_mask=torch.ones_like(ids), images=images).logits


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_adopt_a_directory_llava_wrote_gives_llava_logits(llava_dir):
    llava, _ = _load_llava(llava_dir)
    ours = adopt_llava_dir(llava_dir)
    assert ours.modalities == ["image"] and ours.connector.projector_types["image"] == "mlp2x_gelu"
    assert ours.num_tokens["image"] == 16 and ours.encoders["image"].select_strategy == "default"
    image, audio = _media()
    for prompt in PROMPTS[::2]:
        ref = _fork_logits(llava, ours.tokenizer, prompt, image, audio)
        got = _ours_logits(ours, prompt, image, audio)
        torch.testing.assert_close(got[..., :ref.shape[-1]], ref, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def ours_with_audio(llava_dir):
    from mil_plugins.plugins import MODALITIES

    model = adopt_llava_dir(llava_dir)
    torch.manual_seed(2)
    model.add_modality(MODALITIES.get("audio")(**AUDIO))
    _perturb(model.connector, 3)          # as if trained: the projectors are no longer LLaVA's
    _perturb(model.llm.get_input_embeddings(), 4)
    return model.eval()


def test_export_loads_in_llava_with_no_missing_or_unexpected_keys(ours_with_audio, tmp_path):
    out = export_llava_dir(ours_with_audio, tmp_path / "exported")
    assert {"config.json", "model.safetensors", "vision_tower", "modalities"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["mm_vision_tower"] == str(out / "vision_tower") and cfg["mm_vision_select_feature"] == "patch"
    fork, info = _load_llava(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = ours_with_audio.tokenizer
    image, audio = _media(1)
    with torch.no_grad():  # LLaVA's own image path: equal logits on an image prompt
        for prompt in PROMPTS[::2]:
            torch.testing.assert_close(_fork_logits(fork, tok, prompt, image, audio),
                                       _ours_logits(ours_with_audio, prompt, image, audio),
                                       rtol=0, atol=1e-5)
    load_fork_modalities(fork, out)   # and with our audio beside it
    assert placeholder_indices(fork) == {"<image>": -200, "<audio>": -201}
    for prompt in PROMPTS:
        ref = _ours_logits(ours_with_audio, prompt, image, audio)
        torch.testing.assert_close(_fork_logits(fork, tok, prompt, image, audio), ref, rtol=0, atol=1e-5)


def test_round_trip_ours_llava_dir_ours(ours_with_audio, tmp_path):
    out = export_llava_dir(ours_with_audio, tmp_path / "exported")
    back = adopt_llava_dir(out)
    assert back.modalities == ["image", "audio"]
    assert back.placeholders() == ours_with_audio.placeholders()
    image, audio = _media(2)
    for prompt in PROMPTS:
        torch.testing.assert_close(_ours_logits(back, prompt, image, audio),
                                   _ours_logits(ours_with_audio, prompt, image, audio), rtol=0, atol=0)


def test_a_fork_saves_and_is_adopted(llava_dir, tmp_path):
    fork, _ = _load_llava(llava_dir)
    torch.manual_seed(5)
    add_modalities(fork, {"audio": AUDIO})
    _perturb(fork.get_model().mil_projectors, 6)
    tok = make_tokenizer()
    out = save_fork(fork, tok, tmp_path / "fork")
    reloaded, info = _load_llava(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    load_fork_modalities(reloaded, out)
    ours = adopt_llava_dir(out)
    image, audio = _media(3)
    for prompt in PROMPTS:
        ref = _fork_logits(fork, tok, prompt, image, audio)
        assert torch.equal(_fork_logits(reloaded, tok, prompt, image, audio), ref)
        torch.testing.assert_close(_ours_logits(ours, prompt, image, audio)[..., :ref.shape[-1]], ref,
                                   rtol=0, atol=1e-5)


def test_unsupported_directories_and_models_say_why(llava_dir, tmp_path):
    import shutil

    bad = tmp_path / "anyres"
    shutil.copytree(llava_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mm_patch_merge_type"] = "spatial_unpad"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="anyres.*|only LLaVA-1.5's flat image features"):
        adopt_llava_dir(bad)
    cfg.pop("mm_vision_tower")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no mm_vision_tower"):
        adopt_llava_dir(bad)
    from mil_plugins.model.build import build_model

    text_only = build_model({"llm": {"config": {"model_type": "llama", "hidden_size": 32,
                                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                                "intermediate_size": 64}}}, make_tokenizer())
    with pytest.raises(ValueError, match="no 'image' modality"):
        export_llava_dir(text_only, tmp_path / "x")


def test_llava_builder_loads_the_export_and_preprocesses_images_as_we_do(ours_with_audio, tmp_path):
    """LLaVA's own entry point (llava.model.builder.load_pretrained_model, fp16 on CPU) loads the
    exported directory; its image processor gives our image plugin's tensor; it generates."""
    from PIL import Image
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    out = export_llava_dir(ours_with_audio, tmp_path / "llava-export")
    tok, model, processor, _ = load_pretrained_model(str(out), None, "llava-export", device="cpu")
    assert type(model).__name__ == "LlavaLlamaForCausalLM"
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    theirs = process_images([Image.open(path)], processor, model.config)
    ours = ours_with_audio.plugins["image"].preprocess(path)
    torch.testing.assert_close(theirs[0].float(), ours, rtol=0, atol=1e-5)
    ids = tokenizer_image_token("<image>\nwhat is it ?", tok, return_tensors="pt")[None]
    out_ids = model.generate(ids, images=theirs.to(model.dtype), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out_ids.shape[0] == 1 and 1 <= out_ids.shape[1] <= 3


def test_a_recipe_can_start_from_a_llava_original_directory(llava_dir):
    """model.llm.llava accepts a LLaVA-original directory too (build_from_llava)."""
    from transformers import AutoTokenizer

    from mil_plugins.integrations.hf_llava import build_from_llava

    model = build_from_llava(str(llava_dir), AutoTokenizer.from_pretrained(str(llava_dir)),
                             {"image": {}, "audio": AUDIO})
    assert model.modalities == ["image", "audio"]
    assert model.connector.projector_types == {"image": "mlp2x_gelu", "audio": "mlp2x_gelu"}
    image, audio = _media(4)
    ref = _ours_logits(adopt_llava_dir(llava_dir), PROMPTS[0], image, audio)
    got = _ours_logits(model, PROMPTS[0], image, audio)
    vocab = ref.shape[-1] - 1   # the <image> row each adoption adds is freshly initialised
    assert torch.equal(got[..., :vocab], ref[..., :vocab])


def test_export_a_recipe_model_with_a_shared_connector(tmp_path):
    """A model built from a recipe's model section (image plugin with a pretrained CLIP tower,
    shared connector): each modality's input layer is folded into its LLaVA projector exactly."""
    from llava.model import LlavaLlamaForCausalLM

    from mil_plugins.model.build import build_model, build_tiny_llm_config

    tower = save_tiny_clip_tower(tmp_path / "tower")
    tok = make_tokenizer()
    torch.manual_seed(0)
    ours = build_model({"llm": {"config": build_tiny_llm_config(len(tok), hidden_size=48,
                                                                intermediate_size=96)},
                        "modalities": {"image": {"pretrained": str(tower), "image_size": 32},
                                       "audio": AUDIO},
                        "connector": {"mode": "shared", "projector_type": "mlp2x_gelu",
                                      "shared_dim": 40}}, tok).eval()
    out = export_llava_dir(ours, tmp_path / "exported")
    fork, info = LlavaLlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fork.get_vision_tower().load_model()
    load_fork_modalities(fork.eval(), out)
    image, audio = _media(5)
    for prompt in PROMPTS:
        torch.testing.assert_close(_fork_logits(fork, tok, prompt, image, audio),
                                   _ours_logits(ours, prompt, image, audio), rtol=0, atol=1e-5)


def test_export_merges_lora(ours_with_audio, tmp_path):
    import copy

    from llava.model import LlavaLlamaForCausalLM

    from mil_plugins.model.build import apply_lora

    ours = copy.deepcopy(ours_with_audio)
    ours.llm = apply_lora(ours.llm, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():
        for name, p in ours.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ours.eval()
    out = export_llava_dir(ours, tmp_path / "exported")
    fork, info = LlavaLlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fork.get_vision_tower().load_model()
    load_fork_modalities(fork.eval(), out)
    image, audio = _media(6)
    for prompt in PROMPTS:
        torch.testing.assert_close(_fork_logits(fork, ours.tokenizer, prompt, image, audio),
                                   _ours_logits(ours, prompt, image, audio), rtol=0, atol=1e-5)
