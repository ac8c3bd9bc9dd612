import pytest
import torch

from _model_fixtures import make_tokenizer, one_thread
from mil_plugins.integrations.hf_llava import from_hf_llava, to_hf_llava
from mil_plugins.model.hf_llava import HFVisionTowerEncoder, LlavaVisionPlugin


@pytest.fixture(autouse=True, scope="module")
def _threads():
    with one_thread():
        yield


def _tiny_llava(tok, strategy="default", layer=-2, image_token_id=None, tie=False):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     pad_token_id=tok.pad_token_id, tie_word_embeddings=tie)
    iid = tok.convert_tokens_to_ids("<image>") if image_token_id is None else image_token_id
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=iid, image_seq_length=16,
                      vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def _inputs(tok, image_id, n, b=2):
    text = tok("what is it ?", add_special_tokens=False)["input_ids"]
    seq = [tok.bos_token_id] + [image_id] * n + text
    ids = torch.tensor([seq] * b)
    g = torch.Generator().manual_seed(1)
    return ids, torch.ones_like(ids), torch.randn(b, 3, 32, 32, generator=g)


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -1), ("default", [-2, -1])])
def test_adopt_equal_logits_and_export_round_trip(strategy, layer):
    tok = make_tokenizer(["<image>"])
    llava = _tiny_llava(tok, strategy, layer)
    original = {k: v.clone() for k, v in llava.state_dict().items()}
    image_id = llava.config.image_token_id

    m = from_hf_llava(llava, tok).eval()
    n = (32 // 8) ** 2 + (0 if strategy == "default" else 1)
    assert m.placeholders() == {"<image>": (image_id, n)}
    assert isinstance(m.encoders["image"], HFVisionTowerEncoder)
    assert m.encoders["image"].hidden_size == 32 * (2 if isinstance(layer, list) else 1)
    assert m.connector.mode == "per_modality" and m.connector.projector_types["image"] == "mlp2x_gelu"
    assert sorted(n for n, _ in m.connector.named_parameters()) == [
        "projectors.image.0.bias", "projectors.image.0.weight",
        "projectors.image.2.bias", "projectors.image.2.weight"]

    ids, mask, px = _inputs(tok, image_id, n)
    with torch.no_grad():
        ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        got = m({"input_ids": ids, "attention_mask": mask, "media": {"image": px},
                 "media_kind": {"image": "input"}}).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)

    back = to_hf_llava(m)
    sd = back.state_dict()
    assert set(sd) == set(original)
    for k, v in original.items():
        assert torch.equal(sd[k], v), k
    assert back.config.image_token_id == image_id and back.config.image_seq_length == n
    assert back.config.vision_feature_select_strategy == strategy
    assert back.config.vision_feature_layer == layer


def test_adopted_model_saves_and_loads(tmp_path):
    from mil_plugins.model.io import load_model, save_model

    tok = make_tokenizer(["<image>"])
    m = from_hf_llava(_tiny_llava(tok), tok).eval()
    ids, mask, px = _inputs(tok, m.placeholder_ids["image"], m.num_tokens["image"], b=1)
    batch = {"input_ids": ids, "attention_mask": mask, "media": {"image": px}}
    save_model(m, tmp_path / "adopted")
    loaded = load_model(tmp_path / "adopted").eval()
    assert isinstance(loaded.plugins["image"], LlavaVisionPlugin)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, m(batch).logits)
    assert len(loaded.generate(batch, max_new_tokens=3)) == 1


def test_tokenizer_without_image_token_and_tied_embeddings():
    tok = make_tokenizer()  # no "<image>": it is added and the embeddings grow
    llava = _tiny_llava(tok, image_token_id=len(tok) - 1, tie=True)
    n_vocab = len(tok)
    m = from_hf_llava(llava, tok)
    assert len(tok) == n_vocab + 1 and m.placeholder_ids["image"] == n_vocab
    assert m.llm.get_input_embeddings().weight.shape[0] == n_vocab + 1
    back = to_hf_llava(m)
    assert back.config.image_token_id == n_vocab
    assert back.lm_head.weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()


def test_plugin_preprocess_minimal(tmp_path):
    from PIL import Image

    plugin = LlavaVisionPlugin(vision_config={"model_type": "clip_vision_model", "image_size": 32,
                                              "patch_size": 8}, image_size=32)
    path = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    x = plugin.preprocess(path)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    from mil_plugins.modality import ModalityInputError
    with pytest.raises(ModalityInputError):
        plugin.preprocess(tmp_path / "missing.png")
