"""Training micro-batches, read in the main process or in ``DataLoader`` workers.

``train.dataloader_num_workers`` (HF's name) = 0 reads and collates each micro-batch in the
training process, as before. N > 0 hands the same index lists, in the same order, to a
``torch.utils.data.DataLoader`` with N worker processes: file decoding, ``preprocess``, tokenising
and collating run there while the main process trains, and the batches are exactly the ones the
main process would have built. Workers are forked (they share the dataset, the tokenizer and,
on CPU, the frozen encoders that fill the feature cache); each uses one torch thread.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["micro_batch_stream"]


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def micro_batch_stream(dataset, collate: Callable[[list], dict], index_lists: Sequence[list[int]],
                       num_workers: int = 0) -> Iterator[dict]:
    """One collated batch per list of ``index_lists``, in order."""
    if num_workers <= 0:
        return (collate([dataset[i] for i in idx]) for idx in index_lists)
    from torch.utils.data import DataLoader

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize
    loader = DataLoader(dataset, batch_sampler=[list(idx) for idx in index_lists],
                        collate_fn=collate, num_workers=num_workers, worker_init_fn=_one_thread,
                        multiprocessing_context="fork")
    return iter(loader)
