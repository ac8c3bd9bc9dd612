"""A torch ``Dataset`` of validated samples: token ids + labels (or prompt + answer) + media tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from mil_plugins.data.errors import DataError
from mil_plugins.data.manifest import ManifestData, Sample
from mil_plugins.data.templates import Template, get_template
from mil_plugins.data.tokenize import encode_for_generation, encode_for_training
from mil_plugins.modality import ModalityInputError

MEDIA_KINDS = ("input", "features")

MediaLoader = Callable[[str, Path], "tuple[str, torch.Tensor]"]


class MultimodalDataset(Dataset):
    """Samples -> items for :class:`~mil_plugins.data.collate.Collator`.

    ``plugins``: modality name -> plugin instance (every modality the samples use).
    ``placeholders``: placeholder -> ``(token_id, num_tokens)`` (see :mod:`mil_plugins.data.tokenize`).
    ``mode``: ``"train"`` (input_ids + labels) or ``"eval"`` (generation prompt + reference answer).
    ``media_loader(modality, path) -> (kind, tensor)``: ``("input", preprocessed)`` or
    ``("features", encoder features [T, D])`` (a feature cache); default: ``plugin.preprocess``.

    An item is a dict: ``id``, ``input_ids`` (LongTensor [L]), ``labels`` (LongTensor [L], train
    only), ``answer`` (str, eval only), ``media`` (list of ``(modality, kind, tensor)`` in
    placeholder order), ``modalities`` (the modality of each media entry, same order), ``task``,
    ``metric``.
    """

    def __init__(self, samples: Sequence[Sample] | ManifestData, tokenizer: Any,
                 template: Template | str, plugins: Mapping[str, Any],
                 placeholders: Mapping[str, tuple[int, int]], max_length: int | None,
                 mode: str = "train", media_loader: MediaLoader | None = None,
                 on_overflow: str = "error"):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.samples = list(samples.samples if isinstance(samples, ManifestData) else samples)
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.plugins = dict(plugins)
        missing = [p.placeholder for p in self.plugins.values() if p.placeholder not in placeholders]
        if missing:
            raise ValueError(f"no (token_id, num_tokens) for placeholder(s) {missing}")
        self.placeholders = dict(placeholders)
        self.max_length = max_length
        self.mode = mode
        self.on_overflow = on_overflow
        self.media_loader = media_loader or self._preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def _preprocess(self, modality: str, path: Path) -> tuple[str, torch.Tensor]:
        return "input", self.plugins[modality].preprocess(path)

    def encode(self, index: int) -> dict[str, Any]:
        """The token part of item ``index`` (no media loaded)."""
        sample = self.samples[index]
        if self.mode == "train":
            return encode_for_training(sample, self.tokenizer, self.template, self.placeholders,
                                       self.max_length, self.on_overflow)
        return encode_for_generation(sample, self.tokenizer, self.template, self.placeholders,
                                     self.max_length)

    def check_tokens(self) -> None:
        """Encode every sample once (no media), raising the first :class:`DataError`."""
        for i in range(len(self)):
            self.encode(i)

    def media_of(self, sample: Sample) -> list[tuple[str, Path]]:
        unknown = [m for m in sample.modalities if m not in self.plugins]
        if unknown:
            raise sample.error(f"modality {unknown[0]!r} has no plugin here "
                               f"(enabled: {', '.join(sorted(self.plugins)) or 'none'})")
        return sample.media_in_order(self.plugins)

    def load_media(self, sample: Sample, modality: str, path: Path) -> tuple[str, torch.Tensor]:
        try:
            kind, tensor = self.media_loader(modality, path)
        except ModalityInputError as exc:
            raise sample.error(f"{modality} file {path}: {exc.problem}", file=path) from exc
        except DataError as exc:
            raise exc.with_context(manifest=sample.manifest, sample_id=sample.id,
                                   index=sample.index, file=path) from exc
        except Exception as exc:  # a plugin bug: keep its type, say where it happened
            exc.add_note(f"while loading {modality} file {path} of sample {sample.id!r} "
                         f"({sample.manifest})")
            raise
        if kind not in MEDIA_KINDS:
            raise sample.error(f"media loader returned kind {kind!r} for {path}; expected "
                               f"'input' or 'features'", file=path)
        if not isinstance(tensor, torch.Tensor):
            raise sample.error(f"{modality} file {path}: the loader returned "
                               f"{type(tensor).__name__}, not a tensor", file=path)
        if kind == "features" and tensor.dim() != 2:
            raise sample.error(f"{modality} features for {path} have shape {tuple(tensor.shape)}; "
                               f"expected [tokens, dim]", file=path)
        return kind, tensor

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        enc = self.encode(index)
        media = []
        for modality, path in self.media_of(sample):
            kind, tensor = self.load_media(sample, modality, path)
            media.append((modality, kind, tensor))
        item: dict[str, Any] = {
            "id": sample.id,
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "media": media,
            "modalities": [m for m, _, _ in media],
            "task": sample.task,
            "metric": sample.metric,
        }
        if self.mode == "train":
            item["labels"] = torch.tensor(enc["labels"], dtype=torch.long)
        else:
            item["answer"] = enc["answer"]
        return item
