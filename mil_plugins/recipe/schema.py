"""The recipe schema: every section, key, type and default, as plain data.

A field is ``(type, default)``; ``type`` is a Python type, a tuple of types, ``None`` allowed via
``Optional``, or a nested schema (dict). ``REQUIRED`` marks fields without a default. Sections that
are free-form maps (``modalities``: options per modality plugin) are checked by the plugins
themselves in ``recipe.validate``.
"""

from __future__ import annotations

from typing import Any

REQUIRED = object()
ANY = object()


class Optional:
    """A field that may also be null."""

    def __init__(self, *types: Any):
        self.types = types


class ListOf:
    def __init__(self, item: Any):
        self.item = item


class MapOf:
    """A mapping with free keys (names) and values of one type or schema."""

    def __init__(self, value: Any):
        self.value = value


NUMBER = (int, float)

LLM = {
    "pretrained": (Optional(str), None),     # hub id or local dir, e.g. lmsys/vicuna-7b-v1.5
    "config": (Optional(dict), None),        # AutoConfig.for_model kwargs for a model built from config
    "llava": (Optional(str), None),          # adopt a LlavaForConditionalGeneration (llava-hf/...):
                                             # its tower + projector become the image modality
}

TOKENIZER = {
    "pretrained": (Optional(str), None),     # defaults to llm.pretrained
    "build_from_data": (bool, False),        # word-level tokenizer over the recipe's manifests
}

CONNECTOR = {
    "mode": (str, "shared"),                 # shared | per_modality
    "projector_type": (Optional(str), "mlp2x_gelu"),
    "projector_types": (MapOf(str), {}),
    "shared_dim": (Optional(int), None),
    "standardize": (bool, False),            # per-modality feature standardiser, fitted at its first stage
    "mix_tokens": (Optional(int), None),     # shared mode: input layers read all tokens, write this many
    "mix_tokens_by_modality": (MapOf(Optional(int)), {}),  # per-modality override ({image: null})
}

LORA = {
    "r": (int, 8),
    "alpha": (NUMBER, 16),
    "dropout": (NUMBER, 0.0),
    "target_modules": (ListOf(str), ["q_proj", "v_proj"]),
}

MODEL = {
    "llm": (LLM, REQUIRED),
    "tokenizer": (TOKENIZER, {}),
    "template": (str, "v1"),
    "max_length": (int, 512),
    "dtype": (str, "float32"),               # float32 | bfloat16 | float16
    "connector": (CONNECTOR, {}),
    "lora": (Optional(LORA), None),
}

GENERATE = {
    "size": (str, "tiny"),
    "seed": (int, 0),
    "sequence": (str, "modality"),           # modality | mixed (also the mixed sequence's manifests)
}

DATA = {
    "root": (str, REQUIRED),                 # media and manifest paths are relative to it
    "generate": (Optional(GENERATE), None),  # generate the built-in benchmark here when missing
    "on_error": (str, "raise"),              # raise | skip (skipped samples are counted)
    "max_train_samples": (Optional(int), None),
    "max_test_samples": (Optional(int), None),
    "preflight": (str, "full"),              # before stage 1: full (every media file decoded) |
                                             # manifests (structure and metrics only) | off
}

PRETRAIN_DATA = {
    "root": (str, REQUIRED),                 # manifests and media of the pretraining data
    "generate": (Optional(GENERATE), None),  # generate the built-in benchmark there when missing
}

#: encoders trained once on labelled data of their modality (mil_plugins.engine.encoder_pretraining)
ENCODER_PRETRAINING = {
    "data": (PRETRAIN_DATA, REQUIRED),
    "manifests": (ListOf(str), ["{modality}/train.json", "{modality}/test.json"]),
    "modalities": (Optional(ListOf(str)), None),   # null: every stage's modality
    "steps": (int, 1000),
    "steps_by_modality": (MapOf(int), {}),   # e.g. {point: 300}: a modality's own step count
    "batch_size": (int, 32),
    "lr": (NUMBER, 1.0e-3),
    "weight_decay": (NUMBER, 0.01),
    "seed": (int, 0),
    "dir": (Optional(str), None),            # where the weights are kept (null: <data.root>/encoders)
    "workers": (int, 1),                     # modalities trained at once (processes)
}

STAGE = {
    "name": (str, REQUIRED),
    "modality": (Optional(str), None),       # None = text only
    "train": (str, REQUIRED),                # manifest relative to data.root
    "test": (Optional(str), None),
    "epochs": (Optional(NUMBER), None),      # default: train.epochs
    "max_steps": (Optional(int), None),
    "lr": (Optional(NUMBER), None),
    "mm_projector_lr": (Optional(NUMBER), None),
    "trainable": (Optional(ListOf(str)), None),
}

METHOD = {
    "name": (str, REQUIRED),
    "options": (dict, {}),
}

TRAIN = {
    "seed": (int, 0),
    "data_seed": (Optional(int), None),      # HF: the training batches' order (default: seed)
    "batch_size": (int, 16),                 # global batch (all ranks x accumulation)
    "per_device_train_batch_size": (Optional(int), None),  # HF: micro batch per rank; when set,
                                             # the global batch is it x world size x grad_accum
    "grad_accum": (int, 1),
    "epochs": (NUMBER, 1),
    "max_steps": (Optional(int), None),
    "lr": (NUMBER, 2e-5),
    "mm_projector_lr": (Optional(NUMBER), None),  # LLaVA's separate projector LR
    "weight_decay": (NUMBER, 0.0),
    "warmup_ratio": (NUMBER, 0.03),
    "warmup_steps": (Optional(int), None),   # HF: wins over warmup_ratio when set
    "scheduler": (str, "cosine"),            # any transformers.get_scheduler type (SCHEDULERS)
    "lr_scheduler_kwargs": (dict, {}),       # HF: the scheduler's own arguments (num_cycles, min_lr ...)
    "max_grad_norm": (NUMBER, 1.0),
    "trainable": (ListOf(str), ["connector"]),
    "precision": (str, "fp32"),              # fp32 | bf16 | fp16
    "deepspeed": (Optional(str), None),      # a ZeRO JSON (recipes/deepspeed/...) used under the launcher
    "save_every_steps": (int, 0),
    "feature_cache": (bool, True),
    "num_threads": (Optional(int), None),    # torch CPU threads (null: torch's default); 1 is
                                             # fastest for tiny models on small machines
    "log_every_steps": (int, 10),
    "gradient_checkpointing": (bool, False),  # HF: recompute the LLM's activations in backward
    "dataloader_num_workers": (int, 0),      # HF: preprocessing in this many DataLoader workers
}

WARMUP = {
    "train": (str, REQUIRED),
    "epochs": (NUMBER, 1),
    "max_steps": (Optional(int), None),
    "lr": (Optional(NUMBER), None),
    "trainable": (ListOf(str), ["llm"]),
}

EVAL = {
    "batch_size": (int, 32),
    "max_new_tokens": (int, 16),
    "unseen": (bool, False),                 # also score stages not trained yet (forward transfer)
    "baseline": (bool, False),               # score every stage before any training (b_i for FWT)
    "choices": (Optional(str), None),        # null: generate answers; task / sample: pick the
                                             # likeliest of the task's answers / the sample's options
                                             # (exact-match tasks; mil_plugins/choices.py)
}

OUTPUT = {
    "dir": (str, REQUIRED),
    "tensorboard": (bool, True),
    "report_to": (Optional(ListOf(str)), None),  # HF: tensorboard | wandb (null: from `tensorboard`)
    "keep_stage_checkpoints": (bool, True),
}

FEDERATED = {                                # `mil federate RECIPE` (docs/federated.md)
    "clients": (int, 3),                     # number of clients (Flower SuperNodes / virtual clients)
    "rounds": (int, 2),
    "clients_per_round": (Optional(int), None),  # null: every client every round
    "local_epochs": (NUMBER, 1),             # per round, over the client's own data
    "local_steps": (Optional(int), None),    # wins over local_epochs when set
    "split": (str, "task"),                  # task | modality | dirichlet | pooled
    "dirichlet_alpha": (NUMBER, 0.5),        # split: dirichlet (smaller: more skewed clients)
    "dirichlet_label": (str, "task"),        # split: dirichlet over this label: task | answer
    "aggregator": (str, "fedavg"),           # a registered aggregator (mil plugins): fedavg, ...
    "aggregator_options": (dict, {}),
    "client_cpus": (NUMBER, 1),              # Simulation Engine: CPUs per virtual client
}

RECIPE = {
    "extends": (Optional(str), None),
    "model": (MODEL, REQUIRED),
    "modalities": (MapOf(dict), {}),
    "data": (DATA, REQUIRED),
    "warmup": (Optional(WARMUP), None),
    "encoder_pretraining": (Optional(ENCODER_PRETRAINING), None),
    "stages": (ListOf(STAGE), REQUIRED),
    "methods": (ListOf(METHOD), [{"name": "finetune"}]),
    "train": (TRAIN, {}),
    "eval": (EVAL, {}),
    "output": (OUTPUT, REQUIRED),
    "federated": (Optional(FEDERATED), None),
}

#: every ``transformers.SchedulerType`` (``transformers.get_scheduler`` builds them; a test keeps
#: this list equal to transformers')
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
              "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy")
REPORT_TO = ("tensorboard", "wandb")

TRAINABLE_GROUPS = ("llm", "lora", "connector", "encoder", "embeddings")
CHOICES = {
    ("model", "connector", "mode"): ("shared", "per_modality"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("data", "on_error"): ("raise", "skip"),
    ("data", "preflight"): ("full", "manifests", "off"),
    ("data", "generate", "size"): ("tiny", "small", "full"),
    ("data", "generate", "sequence"): ("modality", "mixed"),
    ("encoder_pretraining", "data", "generate", "size"): ("tiny", "small", "full"),
    ("encoder_pretraining", "data", "generate", "sequence"): ("modality", "mixed"),
    ("train", "scheduler"): SCHEDULERS,
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("federated", "split"): ("task", "modality", "dirichlet", "pooled"),
    ("federated", "dirichlet_label"): ("task", "answer"),
    ("eval", "choices"): ("task", "sample"),
}


class Range:
    """Allowed numbers: ``lo``/``hi`` bounds (``None``: open), ``lo_open``: ``> lo`` instead of
    ``>= lo``. NaN and infinities are never allowed."""

    def __init__(self, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def contains(self, x) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        return " and ".join(parts) or "a finite number"


POSITIVE = Range(0, lo_open=True)      # > 0
AT_LEAST_1 = Range(1)                  # >= 1 (counts, sizes)
NON_NEGATIVE = Range(0)                # >= 0

#: value ranges by key path (``*``: any list index or map key); null values are not checked
RANGES = {
    ("model", "max_length"): AT_LEAST_1,
    ("model", "connector", "shared_dim"): AT_LEAST_1,
    ("model", "lora", "r"): AT_LEAST_1,
    ("model", "lora", "alpha"): POSITIVE,
    ("model", "lora", "dropout"): Range(0, 1, hi_open=True),
    ("data", "generate", "seed"): NON_NEGATIVE,
    ("data", "max_train_samples"): AT_LEAST_1,
    ("data", "max_test_samples"): AT_LEAST_1,
    ("stages", "*", "epochs"): POSITIVE,
    ("stages", "*", "max_steps"): AT_LEAST_1,
    ("stages", "*", "lr"): NON_NEGATIVE,
    ("stages", "*", "mm_projector_lr"): NON_NEGATIVE,
    ("train", "seed"): NON_NEGATIVE,
    ("train", "data_seed"): NON_NEGATIVE,
    ("train", "batch_size"): AT_LEAST_1,
    ("train", "grad_accum"): AT_LEAST_1,
    ("train", "epochs"): POSITIVE,
    ("train", "max_steps"): AT_LEAST_1,
    ("train", "lr"): NON_NEGATIVE,
    ("train", "mm_projector_lr"): NON_NEGATIVE,
    ("train", "weight_decay"): NON_NEGATIVE,
    ("train", "warmup_ratio"): Range(0, 1),
    ("train", "max_grad_norm"): NON_NEGATIVE,   # 0 = no clipping
    ("train", "save_every_steps"): NON_NEGATIVE,  # 0 = only at stage ends
    ("train", "num_threads"): AT_LEAST_1,
    ("train", "log_every_steps"): AT_LEAST_1,
    ("train", "per_device_train_batch_size"): AT_LEAST_1,
    ("train", "warmup_steps"): NON_NEGATIVE,
    ("train", "dataloader_num_workers"): NON_NEGATIVE,
    ("warmup", "epochs"): POSITIVE,
    ("warmup", "max_steps"): AT_LEAST_1,
    ("warmup", "lr"): NON_NEGATIVE,
    ("encoder_pretraining", "steps"): AT_LEAST_1,
    ("encoder_pretraining", "batch_size"): AT_LEAST_1,
    ("encoder_pretraining", "steps_by_modality", "*"): AT_LEAST_1,
    ("encoder_pretraining", "workers"): AT_LEAST_1,
    ("encoder_pretraining", "lr"): POSITIVE,
    ("encoder_pretraining", "weight_decay"): NON_NEGATIVE,
    ("encoder_pretraining", "seed"): NON_NEGATIVE,
    ("encoder_pretraining", "data", "generate", "seed"): NON_NEGATIVE,
    ("eval", "batch_size"): AT_LEAST_1,
    ("eval", "max_new_tokens"): AT_LEAST_1,
    ("federated", "clients"): AT_LEAST_1,
    ("federated", "rounds"): AT_LEAST_1,
    ("federated", "clients_per_round"): AT_LEAST_1,
    ("federated", "local_epochs"): POSITIVE,
    ("federated", "local_steps"): AT_LEAST_1,
    ("federated", "dirichlet_alpha"): POSITIVE,
    ("federated", "client_cpus"): POSITIVE,
}

#: strings that must not be empty (an empty output.dir would write into the working directory)
NON_EMPTY = {("data", "root"), ("encoder_pretraining", "data", "root"), ("output", "dir"), ("stages", "*", "name"), ("stages", "*", "train"),
             ("warmup", "train"), ("model", "template")}
#: stage names become checkpoint folder names (stage-01-NAME)
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
