"""Task descriptors computed from data, and the similarity between them (``tir`` and ``tme``).

He et al., "Continual Instruction Tuning for Large Multimodal Models" (arXiv 2311.16206) weigh
regularisation (TIR) and choose expansion (TME) by the similarity of tasks, embedded from their
images, instructions and answers. Their exact embeddings and formulas are not public; everything
below is **our** choice.

A descriptor has up to three parts, each L2-normalised:

``features``
    the modality's *frozen encoder* output of an item (``model.encode``; raw, before the
    connector's standardiser, which would centre every stage's mean to zero), mean-pooled over
    tokens, L2-normalised, then mapped to a common width ``dim`` by a fixed Gaussian random
    projection of its own per modality (seeded by the modality's name and the encoder width).
    Encoders of different modalities have different widths *and* unrelated feature spaces, so no
    map can make their features meaningfully comparable without paired data: the projection keeps
    cosine geometry within a modality (Johnson-Lindenstrauss) and puts two modalities at about zero
    cosine to each other (independent projections), i.e. "not similar" by construction. Across
    modalities, similarity comes from the text parts.
``instruction``
    the mean of the LLM's *input embedding* rows of the prompt's text tokens (placeholders,
    padding and special tokens excluded): one space for every modality.
``answer``
    the same over the answer tokens (stages only; an input at inference has no answer).

A stage's descriptor is the mean of its items' normalised parts, normalised again. The similarity
of two descriptors is the weighted mean of the cosines of the parts both have::

    sim(a, b) = sum_p w_p cos(a_p, b_p) / sum_p w_p      over parts p present in both

(``weights``, default 1 each), in [-1, 1]. An item's descriptor (prompt + media, no answer) is
compared with stage descriptors the same way, so routing reads only the input.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable

import torch
import torch.nn.functional as F

PARTS = ("features", "instruction", "answer")
DEFAULT_WEIGHTS = {"features": 1.0, "instruction": 1.0, "answer": 1.0}


def check_weights(method: str, weights: Any) -> dict[str, float]:
    """``weights`` (a dict over :data:`PARTS`) checked, missing parts at their default (1) -- or a
    clear error."""
    if not isinstance(weights, dict) or set(weights) - set(PARTS):
        raise ValueError(f"method {method!r}: descriptor_weights must be a mapping over {PARTS}, "
                         f"got {weights!r}")
    out = {p: float(weights.get(p, DEFAULT_WEIGHTS[p])) for p in PARTS}
    if any(w < 0 for w in out.values()) or not any(out.values()):
        raise ValueError(f"method {method!r}: descriptor_weights must be >= 0 with at least one "
                         f"> 0, got {weights!r}")
    return out


def projection(modality: str, width: int, dim: int) -> torch.Tensor:
    """The fixed ``[width, dim]`` Gaussian map of ``modality``'s features (same in every process)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"descriptor/{modality}/{int(width)}/{int(dim)}".encode()))
    return torch.randn(int(width), int(dim), generator=g) / float(dim) ** 0.5


def similarity(a: dict, b: dict, weights: dict[str, float]) -> float:
    """Weighted mean of the parts' cosines over the parts both descriptors have (0 if none)."""
    num, den = 0.0, 0.0
    for part in PARTS:
        w = float(weights.get(part, 0.0))
        x, y = a.get(part), b.get(part)
        if w <= 0 or x is None or y is None:
            continue
        num += w * float(F.cosine_similarity(x.float().flatten(), y.float().flatten(), dim=0))
        den += w
    return num / den if den else 0.0


def similarity_matrix(items: list[dict], stages: list[dict], weights: dict[str, float]) -> torch.Tensor:
    """``[N, K]`` similarities of item descriptors to stage descriptors."""
    return torch.tensor([[similarity(i, s, weights) for s in stages] for i in items],
                        dtype=torch.float32).reshape(len(items), len(stages))


def _mean_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    if ids.numel() == 0:
        return None
    return F.normalize(table[ids.to(table.device)].float().mean(0), dim=0)


def _text_ids(model) -> set[int]:
    """Token ids that are not text: padding, special tokens, modality placeholders."""
    tok = model.tokenizer
    skip = set(getattr(tok, "all_special_ids", []) or [])
    skip |= {int(v) for v in getattr(model, "placeholder_ids", {}).values()}
    if tok.pad_token_id is not None:
        skip.add(int(tok.pad_token_id))
    return skip


@torch.no_grad()
def item_descriptors(model, batch: dict, dim: int, with_answer: bool = True) -> list[dict]:
    """One descriptor per sample of ``batch``: its media features, prompt and (``with_answer`` and
    ``labels`` present) answer. Reads ``input_ids``, ``attention_mask``, ``labels``, ``media``,
    ``media_kind`` and ``modalities``; never ``tasks``, ``ids``, ``answers`` or a stage."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    table = model.llm.get_input_embeddings().weight.detach()
    skip = torch.tensor(sorted(_text_ids(model)), dtype=torch.long, device=ids.device)
    is_text = mask & ~torch.isin(ids, skip)
    prompt = is_text if labels is None else is_text & (labels == -100)
    answer = None if labels is None or not with_answer else is_text & (labels != -100)
    out = [{"features": None, "instruction": _mean_rows(table, ids[i][prompt[i]]),
            "answer": None if answer is None else _mean_rows(table, ids[i][answer[i]])}
           for i in range(ids.shape[0])]
    per_item = batch.get("modalities") or []
    for m, x in (batch.get("media") or {}).items():
        if x is None or len(x) == 0:
            continue
        feats = model.encode(m, x, (batch.get("media_kind") or {}).get(m, "input")).detach().float()
        pooled = F.normalize(feats.mean(dim=1), dim=-1)
        proj = projection(m, pooled.shape[-1], dim).to(pooled.device)
        rows = F.normalize(pooled @ proj, dim=-1)
        owners = [i for i, mods in enumerate(per_item) for mm in mods if mm == m]
        if len(owners) != rows.shape[0]:  # no per-item map: one media item per sample, in order
            owners = list(range(rows.shape[0]))
        for i in sorted(set(owners)):
            mine = rows[[j for j, o in enumerate(owners) if o == i]]
            prev = out[i]["features"]
            vec = mine.sum(0) + (prev if prev is not None else 0)
            out[i]["features"] = F.normalize(vec, dim=0)
    return out


def mean_descriptor(descs: Iterable[dict]) -> dict:
    """The stage descriptor: per part, the normalised mean of the items' normalised parts."""
    sums: dict[str, torch.Tensor] = {}
    for d in descs:
        for part in PARTS:
            v = d.get(part)
            if v is not None:
                sums[part] = v.float().cpu() + sums.get(part, 0)
    return {p: (F.normalize(sums[p], dim=0) if p in sums else None) for p in PARTS}


@torch.no_grad()
def stage_descriptor(ctx, stage, dim: int, samples: int | None) -> dict:
    """The descriptor of ``stage`` from (the first ``samples`` of) its training samples, in eval
    mode on CPU-stored tensors; ``{}`` parts stay ``None`` when the data has none."""
    picked = list(stage.train_samples)
    if samples is not None:
        picked = picked[: int(samples)]
    model = ctx.model
    was = model.training
    model.eval()
    try:
        descs = []
        for batch in ctx.make_loader(picked, mode="train", batch_size=16):
            descs += item_descriptors(model, batch, dim)
    finally:
        model.train(was)
    return mean_descriptor(descs)


def to_state(desc: dict) -> dict:
    """A descriptor as checkpoint state (tensors stay tensors; absent parts are left out)."""
    return {p: desc[p].detach().float().cpu() for p in PARTS if desc.get(p) is not None}


def from_state(state: dict) -> dict:
    return {p: (state[p].detach().float().cpu() if state.get(p) is not None else None) for p in PARTS}
