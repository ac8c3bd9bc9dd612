"""The data half: LLaVA manifests for any number of modalities, conversation templates,
tokenisation with placeholder expansion, a torch Dataset, the collator, and ``mil check-data``.

    manifest      load_manifest / load_manifests -> ManifestData(samples, skipped)
    templates     get_template("plain" | "v1" | "llava_v1" | "qa" | any LLaVA conv_templates name)
    tokenize      encode_for_training / encode_for_generation (placeholder runs, -100 masking)
    tiny_tokenizer build_word_tokenizer (tests, quickstart)
    dataset       MultimodalDataset
    collate       Collator (the batch dict contract is in its docstring)
    check         check_manifest / run_check_data
"""

from mil_plugins.data.check import BadSample, CheckReport, check_manifest, run_check_data
from mil_plugins.data.collate import BATCH_KEYS, Collator
from mil_plugins.data.dataset import MultimodalDataset
from mil_plugins.data.errors import DataError
from mil_plugins.data.manifest import (ManifestData, Sample, SkippedSample, load_manifest,
                                       load_manifests)
from mil_plugins.data.templates import TEMPLATES, Template, get_template
from mil_plugins.data.tiny_tokenizer import build_word_tokenizer
from mil_plugins.data.tokenize import (IGNORE_INDEX, add_placeholder_tokens, encode_for_generation,
                                       encode_for_training, placeholder_tokens)

__all__ = [
    "BATCH_KEYS", "BadSample", "CheckReport", "Collator", "DataError", "IGNORE_INDEX",
    "ManifestData", "MultimodalDataset", "Sample", "SkippedSample", "TEMPLATES", "Template",
    "add_placeholder_tokens", "build_word_tokenizer", "check_manifest", "encode_for_generation",
    "encode_for_training", "get_template", "load_manifest", "load_manifests", "placeholder_tokens",
    "run_check_data",
]
