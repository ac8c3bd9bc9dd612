"""Shared helpers of the tests against LLaVA's own code (the ``llava`` package, llava-torch):
a LLaMA-style tokenizer trained here, a tiny ``LlavaLlamaForCausalLM`` with a config-built CLIP
tower saved to a local directory (LLaVA's tower loader reads a path), and LLaVA's training-side
``preprocess_*`` functions."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def llama_tokenizer(texts: list[str], legacy: bool = False, vocab_size: int = 700,
                    extra_special: list[str] | None = None):
    """A ``LlamaTokenizer`` (SentencePiece-style BPE: ``▁`` word prefix, byte fallback, BOS added)
    trained on ``texts``; ``legacy`` as in LLaMA's tokenizer (prefix ``▁`` after special tokens);
    ``extra_special``: added special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # trained word by word, with "\n" on its own (LLaMA's byte-fallback <0x0A> never merges)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + BYTE_TOKENS)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=legacy, add_bos_token=True)
    tok.pad_token = tok.unk_token
    tok.model_max_length = 2048
    if extra_special:
        tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in extra_special],
                       special_tokens=True)
    return tok


def llava_preprocess():
    """``llava.train.train`` (its ``preprocess_v1``, ``preprocess_plain``, ...). It imports
    ``ALL_LAYERNORM_LAYERS`` from ``transformers.trainer``, which transformers 5 removed: the
    name is put back (LLaVA uses it only to pick weight-decay groups) before the import."""
    import transformers.trainer
    from torch import nn

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        transformers.trainer.ALL_LAYERNORM_LAYERS = [nn.LayerNorm]
    import llava.train.train as train

    return train


def save_tiny_clip_tower(directory: Path, image_size: int = 32, patch_size: int = 8,
                         hidden_size: int = 32, seed: int = 0) -> Path:
    """A config-built CLIP vision tower + image processor in ``directory`` (what LLaVA's
    ``CLIPVisionTower`` loads from ``mm_vision_tower``)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                          intermediate_size=2 * hidden_size, num_hidden_layers=2,
                          num_attention_heads=4)
    CLIPVisionModel(vc).save_pretrained(str(directory))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(directory))
    return directory


def tiny_llava_llama(tokenizer, tower_dir: Path, hidden: int = 48, seed: int = 0,
                     projector_type: str = "mlp2x_gelu", select_feature: str = "patch"):
    """A tiny LLaVA-1.5-style ``LlavaLlamaForCausalLM`` (vision tower loaded, eval mode)."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import CLIPVisionConfig

    vc = CLIPVisionConfig.from_pretrained(str(tower_dir))
    cfg = LlavaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      mm_vision_tower=str(Path(tower_dir).resolve()), mm_hidden_size=vc.hidden_size,
                      mm_projector_type=projector_type, mm_vision_select_layer=-2,
                      mm_vision_select_feature=select_feature, mm_patch_merge_type="flat",
                      mm_use_im_start_end=False, mm_use_im_patch_token=False,
                      image_aspect_ratio="pad", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(cfg)
    model.get_vision_tower().load_model()
    return model.eval()
