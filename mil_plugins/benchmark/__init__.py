"""The built-in modality-incremental benchmark, generated in real file formats.

``make_benchmark(out_dir, size="tiny", seed=0)`` writes one stage per modality (image -> video ->
audio -> depth -> point cloud) as LLaVA conversation manifests plus PNG / MP4 / WAV / 16-bit PNG /
PLY files, and a text-only warm-up split. Tasks draw on one shared concept space (``concepts.py``) so
that transfer and forgetting can be measured; see ``docs/benchmark.md`` for the dataset card.
"""

from .concepts import (CONCEPTS, MODALITIES, PLACEHOLDERS, TASKS, Task, answer_vocabulary, bleu4,
                       chance_level, corpus_bleu4, exact_match, get_task)
from .generate import BENCHMARK_FILE, SIZES, VERSION, make_benchmark
from .manifest import check_sample, read_manifest, write_json, write_manifest

__all__ = [
    "BENCHMARK_FILE", "CONCEPTS", "MODALITIES", "PLACEHOLDERS", "SIZES", "TASKS", "Task", "VERSION",
    "answer_vocabulary", "bleu4", "chance_level", "check_sample", "corpus_bleu4", "exact_match",
    "get_task", "make_benchmark", "read_manifest", "write_json", "write_manifest",
]
