#!/usr/bin/env python
"""A training step of ours against transformers' Llava + PEFT, same process, same batches.

    python bench/gpu_step.py --shape llava7b [--json bench/results/gpu_step-H200.json]   # a GPU
    python bench/gpu_step.py --shape tiny                                                # CPU, seconds

Two regimes of modality-incremental training, each measured on both sides:

* ``projector_only`` -- LLaVA stage 1: only the image projector (``mlp2x_gelu``) trains; the CLIP
  tower and the LLM are frozen.
* ``lora_projector`` -- LLaVA stage 2 as PEFT does it: LoRA (r=128 at the 7B shape, alpha 2r,
  dropout 0.05, on q/k/v/o/gate/up/down of the LLM) plus the projector.

``ours`` is the engine's real training path: :func:`mil_plugins.engine.loop.train_stage` (data order,
collate, device transfer, method hooks, splice, connector, the plain backend, AdamW, schedule),
a model built from config like the recipes build it (``build_llm``, a ``per_modality``
connector, the HF-Llava image plugin whose CLIP tower is built from a config dict: random weights,
no download). ``anchor`` is what a user would run instead, written after
``shared/bench/llava_hf_peft_baseline.py``: ``LlavaForConditionalGeneration`` from config, SDPA,
``get_peft_model`` for LoRA, ``AdamW``, its batches already on the device. Both sides see the same
token ids, image pixels and labels, in the same order, in the same dtype (bf16 weights on a GPU, no
autocast; float32 on CPU).

Per (regime, side): tokens/s over the timed steps (tokens = batch x sequence, image tokens
included, as the anchor counts them), MFU (model FLOPs per token ``4 N_llm + 2 N_vis T_img / L``,
the anchor script's formula, on both sides, against the GPU's dense bf16 peak: ``PEAK_TFLOPS`` or
a known GPU name; ``n/a`` otherwise and on CPU) and peak memory (``torch.cuda.max_memory_allocated``
after the warm-up steps, one model resident at a time; ``n/a`` on CPU, where the process's peak RSS
cannot be split between the sides). Then the ratios ours / anchor. Timings mean something only on a
GPU; at ``--shape tiny`` this script is a working-order check (tests/test_bench_gpu_step.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling module below
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step_inputs import (  # noqa: E402,F401
    LORA_TARGETS, PEAK_TFLOPS, REGIMES, SHAPES, TARGETS, Shape, batch_order, flops_per_token,
    free, lora_config, make_items, make_tokenizer, n_params, peak_flops, sync)


# ---- ours -----------------------------------------------------------------------------------------

def build_ours(shape: Shape, tok, regime: str, device: torch.device, dtype: torch.dtype):
    """Our model at ``shape``: random Llama from config, per-modality ``mlp2x_gelu`` connector, the
    HF-Llava image plugin with a CLIP tower from a config dict (penultimate layer, CLS dropped),
    LoRA through the engine's ``apply_lora`` in the LoRA regime; trainable groups applied."""
    from mil_plugins.engine.trainable import apply_trainable, group_names
    from mil_plugins.model.build import apply_lora, build_connector, build_llm
    from mil_plugins.model.hf_llava import LlavaVisionPlugin
    from mil_plugins.model.mllm import MultimodalLM

    torch.manual_seed(0)
    with torch.device(device):
        llm = build_llm({"config": dict(shape.llm), "attn_implementation": "sdpa"}, tok, dtype)
        connector = build_connector({"mode": "per_modality", "projector_type": "mlp2x_gelu"},
                                    llm.config.hidden_size)
        model = MultimodalLM(llm, tok, connector)
        plugin = LlavaVisionPlugin(vision_config=dict(shape.vision), vision_feature_layer=-2,
                                   vision_feature_select_strategy="default",
                                   image_size=shape.vision["image_size"])
        model.add_modality(plugin, projector_type="mlp2x_gelu")
        if regime == "lora_projector":
            model.llm = apply_lora(model.llm, lora_config(shape))
    model.to(device=device, dtype=dtype)
    groups = ["connector", "lora"] if regime == "lora_projector" else ["connector"]
    apply_trainable(model, group_names(model, groups, "image"))
    if model.num_tokens["image"] != shape.image_tokens:
        raise RuntimeError(f"our image tower makes {model.num_tokens['image']} tokens, "
                           f"expected {shape.image_tokens}")
    return model


def _step_clock(warmup: int, steps: int, device: torch.device):
    """A method (hooks only) that times the engine's steps after ``warmup`` and resets the
    peak-memory counter there, as the anchor is measured."""
    from mil_plugins.methods.base import Method

    class StepClock(Method):
        name = "step_clock"

        def __init__(self):
            super().__init__()
            self.start = self.end = None

        def after_step(self, ctx, stage, step):
            sync(device)
            now = time.perf_counter()
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                self.start = now
            elif step == warmup + steps:
                self.end = now

    return StepClock()


class _NullLogger:
    def log(self, record: dict) -> None:
        return None


def run_ours(shape: Shape, tok, items: list[dict], regime: str, device: torch.device,
             dtype: torch.dtype, steps: int, warmup: int) -> dict:
    from mil_plugins.data import Collator
    from mil_plugins.engine.distributed import Dist
    from mil_plugins.engine.loop import StagePlan, train_stage
    from mil_plugins.methods.context import MethodContext, Stage
    from mil_plugins.plugins import METHODS

    model = build_ours(shape, tok, regime, device, dtype)
    dist = Dist(device=device)
    stage = Stage(0, "image", "image", train_samples=items)
    clock = _step_clock(warmup, steps, device)
    methods = [METHODS.get("finetune")(), clock]
    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
        ctx = MethodContext(model=model, recipe={}, stages=[stage], dist=dist,
                            output_dir=Path(tmp), seed=0, stage=stage)
        plan = StagePlan(key="bench", index=0, samples=items, epochs=1.0,
                         max_steps=warmup + steps, lr=1e-5, mm_projector_lr=None)
        train_cfg = {"grad_accum": 1, "batch_size": shape.batch, "weight_decay": 0.0,
                     "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0,
                     "precision": "fp32",  # no autocast: bf16 weights on a GPU, as the anchor
                     "seed": 0, "log_every_steps": 10 ** 9, "save_every_steps": 0}
        collate = Collator(tok.pad_token_id, model.plugins)
        result = train_stage(ctx=ctx, plan=plan, methods=methods, dataset=items, collate=collate,
                             train_cfg=train_cfg, dist=dist, ds_config=None, logger=_NullLogger())
    if clock.start is None or clock.end is None or result["steps"] != warmup + steps:
        raise RuntimeError(f"train_stage ran {result['steps']} steps, wanted {warmup + steps}")
    row = _row(shape, regime, "ours", (clock.end - clock.start) / steps, steps, device,
               n_params(model, True), n_params(model))
    row["loss"] = round(float(result["loss"]), 4)
    del model, ctx, methods, clock
    free(device)
    return row


# ---- anchor ---------------------------------------------------------------------------------------

def build_anchor(shape: Shape, image_id: int, device: torch.device, dtype: torch.dtype):
    """``LlavaForConditionalGeneration`` from config (random weights, SDPA), only the projector
    trainable; returns ``(model, projector, n_llm, n_vis)``."""
    from transformers import CONFIG_MAPPING, LlavaConfig, LlavaForConditionalGeneration

    vision = dict(shape.vision)
    vcfg = CONFIG_MAPPING[vision.pop("model_type")](**vision)
    text = dict(shape.llm)
    tcfg = CONFIG_MAPPING[text.pop("model_type")](vocab_size=shape.vocab, pad_token_id=0,
                                                  bos_token_id=2, eos_token_id=3, **text)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id,
                      projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default",
                      image_seq_length=shape.image_tokens)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    inner = model.model
    for p in model.parameters():
        p.requires_grad = False
    proj = inner.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad = True
    return model, proj, n_params(inner.language_model), n_params(inner.vision_tower)


def anchor_batches(items: list[dict], order: list[list[int]], device: torch.device,
                   dtype: torch.dtype) -> list[dict]:
    out = []
    for batch in order:
        chosen = [items[i] for i in batch]
        ids = torch.stack([it["input_ids"] for it in chosen]).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.stack([it["labels"] for it in chosen]).to(device),
                    "pixel_values": torch.stack([it["media"][0][2] for it in chosen]).to(device, dtype)})
    return out


def run_anchor(shape: Shape, items: list[dict], order: list[list[int]], regime: str,
               device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
               image_id: int) -> tuple[dict, float]:
    model, proj, n_llm, n_vis = build_anchor(shape, image_id, device, dtype)
    if regime == "lora_projector":
        from peft import LoraConfig, get_peft_model

        lora = lora_config(shape)
        targets = r".*language_model.*\.(" + "|".join(lora["target_modules"]) + ")"
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora["dropout"],
                                                 target_modules=targets))
        for p in proj.parameters():
            p.requires_grad = True
    batches = anchor_batches(items, order, device, dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(b):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for b in batches[:warmup]:
        step(b)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for b in batches[warmup:warmup + steps]:
        loss = step(b)
    sync(device)
    row = _row(shape, regime, "anchor", (time.perf_counter() - start) / steps, steps, device,
               n_params(model, True), n_params(model))
    row["loss"] = round(float(loss.detach()), 4)
    del model, proj, opt, batches
    free(device)
    return row, flops_per_token(shape, n_llm, n_vis)


# ---- the run --------------------------------------------------------------------------------------

def _row(shape: Shape, regime: str, side: str, step_s: float, steps: int, device: torch.device,
         trainable: int, total: int) -> dict:
    tokens = shape.batch * shape.seq
    peak = (round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            if device.type == "cuda" else None)
    return {"regime": regime, "side": side, "batch": shape.batch, "seq": shape.seq,
            "steps": steps, "step_s": round(step_s, 5), "tokens_per_s": round(tokens / step_s, 1),
            "peak_mem_gib": peak, "trainable": trainable, "total": total}


def ratios(rows: list[dict]) -> dict:
    out = {}
    for regime in REGIMES:
        side = {r["side"]: r for r in rows if r["regime"] == regime}
        if set(side) != {"ours", "anchor"}:
            continue
        ours, anchor = side["ours"], side["anchor"]
        mem = (round(ours["peak_mem_gib"] / anchor["peak_mem_gib"], 3)
               if ours["peak_mem_gib"] and anchor["peak_mem_gib"] else None)
        r = {"tokens_per_s": round(ours["tokens_per_s"] / anchor["tokens_per_s"], 3),
             "peak_mem": mem}
        target = TARGETS[regime]
        r["meets_targets"] = (None if mem is None else
                              r["tokens_per_s"] >= target["tokens_per_s"]
                              and mem <= target["peak_mem"])
        out[regime] = r
    return out


def run(shape_name: str, regimes: list[str], steps: int | None = None,
        warmup: int | None = None, device: str | None = None) -> dict:
    shape = SHAPES[shape_name]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    steps = steps or shape.steps
    warmup = shape.warmup if warmup is None else warmup
    if warmup < 1:
        raise ValueError("--warmup must be at least 1 (the clock starts after a warm-up step)")
    tok = make_tokenizer(shape.vocab)
    image_id = tok.convert_tokens_to_ids("<image>")
    items = make_items(shape, image_id, shape.batch * (warmup + steps))
    order = batch_order(len(items), shape.batch)
    peak = peak_flops(dev)
    rows = []
    for regime in regimes:
        anchor, fpt = run_anchor(shape, items, order, regime, dev, dtype, steps, warmup, image_id)
        ours = run_ours(shape, tok, items, regime, dev, dtype, steps, warmup)
        for row in (ours, anchor):
            row["mfu"] = (round(fpt * row["tokens_per_s"] / peak, 4) if peak else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"shape": shape_name, "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "peak_tflops": peak / 1e12 if peak else None, "steps": steps, "warmup": warmup,
            "rows": rows, "ratios": ratios(rows), "targets": TARGETS}
    try:
        import peft
        import transformers

        info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return info


def table(info: dict) -> str:
    def fmt(value, spec: str) -> str:
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return format("n/a", f">{width}") if value is None else format(value, spec)

    lines = [f"shape {info['shape']} on {info['gpu'] or info['device']} ({info['dtype']})",
             f"{'regime':16s} {'side':7s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s}"]
    for r in info["rows"]:
        lines.append(f"{r['regime']:16s} {r['side']:7s} {r['tokens_per_s']:10.1f} "
                     f"{fmt(r['mfu'], '6.1%')} {fmt(r['peak_mem_gib'], '9.2f')}")
    for regime, r in info["ratios"].items():
        t = TARGETS[regime]
        lines.append(f"{regime:16s} ours/anchor tokens/s {r['tokens_per_s']:.3f} "
                     f"(target >= {t['tokens_per_s']}), peak memory {fmt(r['peak_mem'], '.3f')} "
                     f"(target <= {t['peak_mem']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--regimes", default=",".join(REGIMES),
                        help=f"comma-separated subset of {', '.join(REGIMES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: the shape's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (>= 1)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    bad = [r for r in regimes if r not in REGIMES]
    if bad or not regimes:
        parser.error(f"--regimes: unknown {bad}; choose from {list(REGIMES)}")
    info = run(args.shape, regimes, args.steps, args.warmup, args.device)
    print(table(info), flush=True)
    if args.json:
        from mil_plugins.atomic import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
