#!/usr/bin/env python
"""Training-step cost of the multimodal path, as ratios against baselines measured in the same run.

    python bench/train_step.py [--steps 30] [--batch 16]

Rows (one thread; the timed calls alternate so machine load hits all alike):

* ``splice overhead``: our forward + backward (cached features projected by the trainable
  connector and spliced into the input embeddings, LLM frozen) against the bare HF causal LM doing
  the same work (forward + backward into its input embeddings) -> the cost of the multimodal
  plumbing around the LLM.
* ``feature cache``: a step on cached encoder features against a step that runs the frozen
  encoder on preprocessed inputs -> what caching frozen encoders saves per step.

Absolute times are printed for orientation only (they mean something on a GPU, not here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(modality: str):
    from mil_plugins.data import build_word_tokenizer
    from mil_plugins.model.build import build_model, build_tiny_llm_config
    from mil_plugins.plugins import MODALITIES

    plugin = MODALITIES.get(modality)()
    tok = build_word_tokenizer(["what is shown a red circle"], special_tokens=[plugin.placeholder])
    cfg = build_tiny_llm_config(len(tok))
    model = build_model({"llm": {"config": cfg}, "modalities": {modality: {}},
                         "connector": {"mode": "shared", "projector_type": "mlp2x_gelu",
                                       "shared_dim": 64}}, tok)
    return model, plugin


def batch_for(model, plugin, modality: str, batch: int, text_len: int = 24):
    torch.manual_seed(0)
    ph_id, n = model.placeholders()[plugin.placeholder]
    words = torch.randint(ph_id + 1, len(model.tokenizer), (batch, text_len))  # plain words
    ids = torch.cat([torch.full((batch, n), ph_id), words], dim=1)
    labels = ids.clone()
    labels[:, :n] = -100
    x = torch.randn(batch, *example_input(plugin, modality).shape)
    with torch.no_grad():
        feats = model.encode(modality, x, "input")
    base = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return ({**base, "media": {modality: x}, "media_kind": {modality: "input"}},
            {**base, "media": {modality: feats}, "media_kind": {modality: "features"}})


def example_input(plugin, modality: str) -> torch.Tensor:
    shapes = {"image": (3, 32, 32), "video": (4, 3, 32, 32), "audio": (32, 100),
              "depth": (2, 32, 32), "point": (512, 6)}
    return torch.zeros(shapes[modality])


def timed(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'modality':8s} {'row':16s} {'ours ms':>8s} {'base ms':>8s} {'ours/base':>9s}")
    for modality in ("image", "video", "audio", "depth", "point"):
        model, plugin = build(modality)
        model.train()
        for p in model.llm.parameters():
            p.requires_grad_(False)
        raw, cached = batch_for(model, plugin, modality, args.batch)

        def ours():
            model(cached).loss.backward()

        embedding = model.llm.get_input_embeddings()

        def bare_llm():  # the same LLM work: backward through the frozen LLM into its inputs
            emb = embedding(cached["input_ids"]).detach().requires_grad_()
            model.llm(inputs_embeds=emb, attention_mask=cached["attention_mask"],
                      labels=cached["labels"]).loss.backward()

        def uncached():
            model(raw).loss.backward()

        for fn in (ours, bare_llm, uncached):  # warm-up
            fn()
        a, b, c = [], [], []
        for _ in range(args.steps):
            a += timed(ours, 1)
            b += timed(bare_llm, 1)
            c += timed(uncached, 1)
        ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
        print(f"{modality:8s} {'splice overhead':16s} {ms(a):8.2f} {ms(b):8.2f} {ms(a) / ms(b):9.2f}")
        print(f"{modality:8s} {'feature cache':16s} {ms(a):8.2f} {ms(c):8.2f} {ms(a) / ms(c):9.2f}")


if __name__ == "__main__":
    main()
