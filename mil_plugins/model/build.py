"""Build a :class:`~mil_plugins.model.mllm.MultimodalLM` from the recipe's ``model`` section.

::

    cfg = {
        "llm": {"pretrained": "lmsys/vicuna-7b-v1.5"}            # hub id or local directory
             | {"config": {"model_type": "llama", "hidden_size": 64, ...}},   # random init
        "dtype": "float32" | "bfloat16" | "float16",
        "modalities": {"audio": {...plugin options...}, "image": {}},
        "connector": {"mode": "shared" | "per_modality",
                      "projector_type": "mlp2x_gelu" | None,   # None: plugin.default_projector
                      "projector_types": {"audio": "linear"},  # per_modality overrides
                      "shared_dim": 256},
        "lora": None | {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    }

``llm`` may also carry ``attn_implementation`` (e.g. ``"eager"``, ``"sdpa"``). Unknown keys at
any level raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mil_plugins.model.connector import MODES, Connector
from mil_plugins.model.mllm import MultimodalLM

TOP_KEYS = {"llm", "dtype", "modalities", "connector", "lora"}
LLM_KEYS = {"pretrained", "config", "attn_implementation"}
CONNECTOR_KEYS = {"mode", "projector_type", "projector_types", "shared_dim", "standardize", "mix_tokens",
                  "mix_tokens_by_modality"}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_keys(section: str, cfg: dict, valid: set[str]) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {section}: expected a mapping, got {type(cfg).__name__}")
    for key in cfg:
        if key not in valid:
            raise ValueError(f"model config: unknown key {section + '.' if section else ''}{key!r}; "
                             f"valid: {sorted(valid)}")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    name = str(name).replace("torch.", "")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"model config: dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_tiny_llm_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                          intermediate_size: int = 128, max_position_embeddings: int = 512
                          ) -> dict[str, Any]:
    """A tiny random Llama config (the ``llm.config`` entry) for tests and the CPU quickstart."""
    return {
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
    }


def build_llm(llm_cfg: dict[str, Any], tokenizer: Any, dtype: torch.dtype = torch.float32):
    """The HF causal LM of ``llm_cfg`` (``pretrained`` or ``config``), sized to ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_keys("llm", llm_cfg, LLM_KEYS)
    has_p, has_c = "pretrained" in llm_cfg, "config" in llm_cfg
    if has_p == has_c:
        raise ValueError("model config llm: give exactly one of 'pretrained' and 'config'")
    extra = {}
    if llm_cfg.get("attn_implementation"):
        extra["attn_implementation"] = llm_cfg["attn_implementation"]
    if has_p:
        llm = AutoModelForCausalLM.from_pretrained(str(llm_cfg["pretrained"]), dtype=dtype, **extra)
    else:
        conf = dict(llm_cfg["config"])
        if "model_type" not in conf:
            raise ValueError("model config llm.config: 'model_type' is required (e.g. 'llama')")
        conf["vocab_size"] = len(tokenizer)
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, attr, None) is not None:
                conf.setdefault(attr, getattr(tokenizer, attr))
        model_type = conf.pop("model_type")
        config = AutoConfig.for_model(model_type, **conf)
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return llm


def apply_lora(llm, lora_cfg: dict[str, Any]):
    """``peft.get_peft_model`` with a ``LoraConfig`` from ``{"r", "alpha", "dropout", "target_modules"}``."""
    from peft import LoraConfig, get_peft_model

    _check_keys("lora", lora_cfg, LORA_KEYS)
    config = LoraConfig(r=int(lora_cfg.get("r", 8)), lora_alpha=lora_cfg.get("alpha", 16),
                        lora_dropout=float(lora_cfg.get("dropout", 0.0)),
                        target_modules=lora_cfg.get("target_modules"), task_type="CAUSAL_LM")
    return get_peft_model(llm, config)


def build_connector(conn_cfg: dict[str, Any], llm_hidden: int) -> Connector:
    _check_keys("connector", conn_cfg, CONNECTOR_KEYS)
    mode = conn_cfg.get("mode", "per_modality")
    if mode not in MODES:
        raise ValueError(f"model config connector.mode must be one of {MODES}, got {mode!r}")
    return Connector(llm_hidden, mode, conn_cfg.get("projector_type"), conn_cfg.get("shared_dim"),
                     bool(conn_cfg.get("standardize", False)), conn_cfg.get("mix_tokens"),
                     conn_cfg.get("mix_tokens_by_modality"))


def build_model(cfg: dict[str, Any], tokenizer: Any) -> MultimodalLM:
    """Build the model of a recipe's ``model`` section (see the module docstring)."""
    from mil_plugins.plugins import MODALITIES

    _check_keys("", cfg, TOP_KEYS)
    if "llm" not in cfg:
        raise ValueError("model config: 'llm' is required")
    dtype = resolve_dtype(cfg.get("dtype"))
    conn_cfg = dict(cfg.get("connector") or {})
    modalities = cfg.get("modalities") or {}
    if not isinstance(modalities, dict):
        raise ValueError("model config modalities: expected {name: options}")
    plugins = []
    for name, options in modalities.items():
        plugins.append(MODALITIES.get(name)(**dict(options or {})))
    per_type = conn_cfg.get("projector_types") or {}
    for m in per_type:
        if m not in modalities:
            raise ValueError(f"model config connector.projector_types: unknown modality {m!r}")

    llm = build_llm(cfg["llm"], tokenizer, dtype)
    connector = build_connector(conn_cfg, llm.config.get_text_config().hidden_size)
    model = MultimodalLM(llm, tokenizer, connector)
    for plugin in plugins:
        model.add_modality(plugin, projector_type=per_type.get(plugin.name)
                           or conn_cfg.get("projector_type"))
    if cfg.get("lora"):
        model.llm = apply_lora(model.llm, dict(cfg["lora"]))
    model.to(dtype)
    model.build_info = {"llm": copy.deepcopy(cfg["llm"]), "lora": copy.deepcopy(cfg.get("lora")),
                        "dtype": str(dtype).replace("torch.", "")}
    return model
