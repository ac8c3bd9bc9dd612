"""The shapes and shared inputs of ``bench/gpu_step.py`` (both sides): the model shapes, the
tokenizer, the training items and their order, and the FLOP / memory helpers."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

REGIMES = ("projector_only", "lora_projector")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: dense bf16 peak TFLOP/s by GPU name (SXM parts); PEAK_TFLOPS overrides
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}
#: targets of issue #18: ours / anchor tokens/s at least, peak memory at most
TARGETS = {"projector_only": {"tokens_per_s": 1.3, "peak_mem": 1.0},
           "lora_projector": {"tokens_per_s": 1.8, "peak_mem": 1.0}}


@dataclass(frozen=True)
class Shape:
    vision: dict            # CLIPVisionConfig fields (model_type included)
    llm: dict               # LlamaConfig fields (model_type included; vocab_size comes from `vocab`)
    vocab: int
    batch: int
    text_len: int           # text tokens per sample; the image adds (image_size / patch_size) ** 2
    lora_r: int
    steps: int
    warmup: int

    @property
    def image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2

    @property
    def seq(self) -> int:
        return self.image_tokens + self.text_len


SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 patch tokens, penultimate layer), Vicuna-7B-shaped Llama,
    # batch 4 x 1,088 tokens (576 image + 512 text), as in issue #18's anchor table
    "llava7b": Shape(
        vision={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                "patch_size": 14, "projection_dim": 768},
        llm={"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "tie_word_embeddings": False},
        vocab=32064, batch=4, text_len=512, lora_r=128, steps=8, warmup=2),
    # the same code path in seconds on one CPU core
    "tiny": Shape(
        vision={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56,
                "patch_size": 14},
        llm={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 512, "tie_word_embeddings": False},
        vocab=1000, batch=2, text_len=32, lora_r=8, steps=3, warmup=2),
}


# ---- shared inputs --------------------------------------------------------------------------------

def make_tokenizer(vocab: int):
    """A word-level tokenizer of exactly ``vocab`` entries with ``<image>`` as one special token
    (no download); both sides use its ids."""
    from mil_plugins.data import build_word_tokenizer

    words = " ".join(f"w{i}" for i in range(vocab - 5))  # + <pad> <unk> <s> </s> <image>
    tok = build_word_tokenizer([words], special_tokens=["<image>"])
    if len(tok) != vocab:
        raise RuntimeError(f"tokenizer has {len(tok)} entries, wanted {vocab}")
    return tok


def make_items(shape: Shape, image_id: int, n: int, seed: int = 0) -> list[dict]:
    """``n`` training items as the dataset yields them: ``<image>`` x T_img after a BOS, random
    text, labels = ids with the image positions ignored (the anchor script's batches)."""
    g = torch.Generator().manual_seed(seed)
    size = shape.vision["image_size"]
    items = []
    for i in range(n):
        ids = torch.randint(image_id + 1, shape.vocab, (shape.seq,), generator=g)
        ids[0] = 2  # <s>
        ids[1:1 + shape.image_tokens] = image_id
        labels = ids.masked_fill(ids == image_id, -100)
        pixels = torch.randn(3, size, size, generator=g)
        items.append({"id": f"b{i}", "input_ids": ids, "labels": labels,
                      "media": [("image", "input", pixels)], "modalities": ["image"],
                      "task": None, "metric": None})
    return items


def batch_order(n: int, batch: int) -> list[list[int]]:
    """The engine's own order of the items (one epoch of stage 0, seed 0): the anchor follows it."""
    from mil_plugins.engine.loop import epoch_order

    return epoch_order(n, 0, 0, 0, batch)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def n_params(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def flops_per_token(shape: Shape, n_llm: int, n_vis: int) -> float:
    """The anchor script's model FLOPs per token: frozen tower forward, LLM forward + backward
    through its activations (weight gradients of LoRA / projector not counted)."""
    return 4 * n_llm + 2 * n_vis * shape.image_tokens / shape.seq


def lora_config(shape: Shape) -> dict:
    return {"r": shape.lora_r, "alpha": 2 * shape.lora_r, "dropout": 0.05,
            "target_modules": list(LORA_TARGETS)}
