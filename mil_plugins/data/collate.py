"""Batching items of :class:`~mil_plugins.data.dataset.MultimodalDataset`.

The batch dict has exactly these keys:

    input_ids       LongTensor [B, L]     padded with ``pad_token_id`` (right, or left for generation)
    attention_mask  LongTensor [B, L]     1 on tokens, 0 on padding
    labels          LongTensor [B, L] | None   -100 on padding; None for eval items
    media           dict modality -> Tensor [N_m, ...]   every occurrence of modality m in the batch,
                    sample-major then placeholder order (the order of m's placeholder runs in
                    ``input_ids`` read row by row); inputs batched with ``plugin.collate``,
                    features ``[N_m, T, D]`` with ``torch.stack``
    media_kind      dict modality -> "input" | "features"   (one kind per modality per batch)
    ids             list[str]
    modalities      list[list[str]]       per sample, the modality of each of its media, in order
    answers         list[str] | None      reference answers (eval items), else None
    tasks           list[str | None]
    metrics         list[str | None]

A batch may mix modalities and text-only samples; a modality absent from the batch is absent from
``media``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from mil_plugins.data.errors import DataError
from mil_plugins.data.tokenize import IGNORE_INDEX

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "media", "media_kind", "ids", "modalities",
              "answers", "tasks", "metrics")


class Collator:
    def __init__(self, pad_token_id: int, plugins: Mapping[str, Any], padding_side: str = "right"):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = "
                             "tokenizer.eos_token) before batching")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.plugins = dict(plugins)
        self.padding_side = padding_side

    def _pad(self, seqs: Sequence[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = len(seq)
            if n == 0:
                continue
            if self.padding_side == "right":
                out[i, :n] = torch.as_tensor(seq, dtype=torch.long)
            else:
                out[i, length - n:] = torch.as_tensor(seq, dtype=torch.long)
        return out

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        ids = [str(item["id"]) for item in items]
        seqs = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
        length = max(len(s) for s in seqs)
        input_ids = self._pad(seqs, self.pad_token_id, length)
        attention_mask = self._pad([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, length)

        with_labels = [item.get("labels") is not None for item in items]
        if any(with_labels) and not all(with_labels):
            raise DataError(f"a batch mixes training items (with labels) and eval items: "
                            f"{[i for i, w in zip(ids, with_labels) if not w]} have no labels")
        labels = None
        if all(with_labels):
            labs = [torch.as_tensor(item["labels"], dtype=torch.long) for item in items]
            for sid, s, lab in zip(ids, seqs, labs):
                if len(lab) != len(s):
                    raise DataError(f"labels ({len(lab)}) and input_ids ({len(s)}) differ in "
                                    f"length", sample_id=sid)
            labels = self._pad(labs, IGNORE_INDEX, length)

        with_answers = ["answer" in item for item in items]
        answers = [item["answer"] for item in items] if all(with_answers) else None

        per_modality: dict[str, list[torch.Tensor]] = {}
        kinds: dict[str, tuple[str, str]] = {}  # modality -> (kind, id of the first item)
        modalities: list[list[str]] = []
        for sid, item in zip(ids, items):
            mods = []
            for modality, kind, tensor in item.get("media", ()):
                if modality not in kinds:
                    kinds[modality] = (kind, sid)
                elif kinds[modality][0] != kind:
                    first_kind, first_id = kinds[modality]
                    raise DataError(f"{modality} media of one batch must all be of one kind: "
                                    f"sample {first_id!r} has {first_kind!r}, sample {sid!r} has "
                                    f"{kind!r} (cache every file of a modality, or none)")
                per_modality.setdefault(modality, []).append(tensor)
                mods.append(modality)
            modalities.append(mods)

        media: dict[str, torch.Tensor] = {}
        for modality, tensors in per_modality.items():
            kind = kinds[modality][0]
            try:
                if kind == "features":
                    media[modality] = torch.stack(tensors, 0)
                else:
                    if modality not in self.plugins:
                        raise DataError(f"no plugin for modality {modality!r} in the collator")
                    media[modality] = self.plugins[modality].collate(list(tensors))
            except RuntimeError as exc:
                shapes = sorted({tuple(t.shape) for t in tensors})
                raise DataError(f"cannot batch the {modality} {kind}s of samples {ids}: shapes "
                                f"{shapes}: {exc}") from exc

        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "media": media,
            "media_kind": {m: k for m, (k, _) in kinds.items()},
            "ids": ids,
            "modalities": modalities,
            "answers": answers,
            "tasks": [item.get("task") for item in items],
            "metrics": [item.get("metric") for item in items],
        }
