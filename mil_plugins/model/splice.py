"""Put projected modality features into the LLM's input embeddings at the placeholder positions.

Data contract: a modality's placeholder (e.g. ``<audio>``) is ONE special token; each occurrence
in a sample is expanded by the data pipeline to ``num_tokens`` consecutive copies of its id (as
transformers' Llava does for ``<image>``). The features of all occurrences in the batch come
sample-major, then in placeholder order -- exactly the row-major order of the placeholder
positions -- so one ``masked_scatter`` puts occurrence ``k``'s ``T`` tokens onto the ``k``-th run of
``T`` placeholder positions.
"""

from __future__ import annotations

import torch


class PlaceholderMismatchError(ValueError):
    """The number of placeholder positions does not match the features to put there."""


def placeholder_mask(input_ids: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """Bool ``[B, L]``: where ``input_ids == placeholder_id``."""
    return input_ids == placeholder_id


def splice_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_id: int,
                    features: torch.Tensor | None, modality: str | None = None) -> torch.Tensor:
    """Return ``inputs_embeds [B, L, H]`` with ``features [N, T, H]`` at the placeholder positions.

    Raises :class:`PlaceholderMismatchError` (a ``ValueError``) when the number of positions
    holding ``placeholder_id`` differs from ``N * T`` -- typically a prompt truncated inside its
    placeholder run, or a placeholder expanded with another ``num_tokens`` -- naming the samples
    whose count is not a multiple of ``T``. ``features`` may be ``None`` or have ``N = 0`` when
    the batch has no such placeholder. Out of place; differentiable w.r.t. both inputs.
    """
    what = f"modality {modality!r} (placeholder id {placeholder_id})" if modality else \
        f"placeholder id {placeholder_id}"
    mask = placeholder_mask(input_ids, placeholder_id)
    per_sample = mask.sum(dim=1)
    n_pos = int(per_sample.sum())
    if features is None or features.numel() == 0:
        if n_pos:
            raise PlaceholderMismatchError(
                f"{what}: the batch has {n_pos} placeholder positions but no features")
        return inputs_embeds
    if features.dim() != 3:
        raise ValueError(f"{what}: features must be [N, T, H], got shape {tuple(features.shape)}")
    n, t, h = features.shape
    if h != inputs_embeds.shape[-1]:
        raise ValueError(f"{what}: features have width {h}, the embeddings {inputs_embeds.shape[-1]}")
    if n_pos != n * t:
        bad = [i for i, c in enumerate(per_sample.tolist()) if c % t]
        hint = (f"; samples {bad} have a count that is not a multiple of {t} (a placeholder run "
                f"cut by truncation?)" if bad else "")
        raise PlaceholderMismatchError(
            f"{what}: the batch has {n_pos} placeholder positions but {n} inputs x {t} tokens = "
            f"{n * t} feature tokens{hint}. Each placeholder must be expanded to exactly "
            f"num_tokens={t} copies and never truncated.")
    feats = features.to(dtype=inputs_embeds.dtype, device=inputs_embeds.device).reshape(-1, h)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), feats)
