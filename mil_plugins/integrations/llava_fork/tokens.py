"""Placeholder indices in LLaVA's style and a multi-modality ``tokenizer_image_token``.

LLaVA's data path writes ``IMAGE_TOKEN_INDEX = -200`` into ``input_ids`` where the prompt says
``<image>`` (one index per image, not one per feature token); its model swaps each index for the
image's features. Our modalities get their own negative indices beside it: ``-201``, ``-202``, ...
in the order they are added to a model, recorded in its config (``mil_modalities``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mil_plugins.data.manifest import placeholder_regex

IMAGE_TOKEN_INDEX = -200   # llava.constants.IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100        # llava.constants.IGNORE_INDEX
IMAGE_PLACEHOLDER = "<image>"


def tokenizer_multimodal_token(prompt: str, tokenizer: Any, indices: Mapping[str, int],
                               return_tensors: str | None = None):
    """LLaVA's ``tokenizer_image_token`` for any number of placeholders: ``indices`` maps each
    placeholder string (``"<image>"``, ``"<audio>"``, ...) to its index. The text between
    placeholders is tokenised chunk by chunk exactly as LLaVA does (BOS kept once, at the start),
    so an image-only prompt gives LLaVA's ids."""
    pattern = placeholder_regex(indices)
    pieces = pattern.split(prompt) if pattern is not None else [prompt]
    found = pattern.findall(prompt) if pattern is not None else []
    chunks = [tokenizer(piece).input_ids for piece in pieces]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        ids.extend(chunk[offset:])
        if i < len(found):
            ids.append(int(indices[found[i]]))
    if return_tensors is None:
        return ids
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    raise ValueError(f"unsupported return_tensors {return_tensors!r} (only 'pt')")
