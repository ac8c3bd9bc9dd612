"""``mil export CHECKPOINT --to peft OUT``: the LLM's LoRA as a PEFT adapter directory.

``OUT/`` holds what ``peft.PeftModel.from_pretrained(base, OUT)`` reads (``adapter_config.json``,
``adapter_model.safetensors``) and the tokenizer (with the modality placeholder tokens). The
adapter's ``base_model_name_or_path`` says which base LLM it belongs to:

* the recipe's ``model.llm.pretrained`` (a hub id or directory) when the LLM was loaded from one;
  the LoRA matrices do not depend on the vocabulary, so the adapter loads onto the original model
  (the placeholder tokens only matter with the encoders, which a text-only adapter does not have);
* otherwise (an LLM built from a config, as in the quickstart) the base LLM is written beside it,
  ``OUT/base_model/`` (HF format, LoRA not merged), and named by its absolute path, so
  ``AutoPeftModelForCausalLM.from_pretrained(OUT)`` works as it is.

Only the LoRA travels: encoders, connector and modules a method put inside the LLM's layers
(PathWeave adapters, routed experts) have no place in a PEFT adapter, and such a checkpoint is
refused rather than exported without them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["export_peft"]


def export_peft(model, out: Path) -> list[Path]:
    """Write ``model``'s LoRA to ``out`` (see the module docstring); returns the files written."""
    from mil_plugins.atomic import atomic_dir
    from mil_plugins.model.io import _clean_base_state

    if not model.is_peft:
        raise ValueError("the checkpoint's LLM has no LoRA (recipe model.lora is null), so there is "
                         "no PEFT adapter to export; use --to hf or --to llava-dir for the whole model")
    inside = sorted(k for k in getattr(model, "layer_modules", {}) if k.startswith("llm-"))
    if inside:
        raise ValueError(f"a method put modules inside the LLM's layers ({inside[0]}, ...); a PEFT "
                         f"LoRA adapter has no place for them, so the export would not be exact")
    out = Path(out)
    pretrained = ((model.build_info or {}).get("llm") or {}).get("pretrained")
    with atomic_dir(out) as tmp:
        if pretrained:
            base_ref = str(pretrained)
        else:
            base = model.base_llm()
            base.save_pretrained(str(tmp / "base_model"), state_dict=_clean_base_state(model))
            base_ref = str((out / "base_model").resolve())
        peft_config = model.llm.peft_config["default"]
        previous = peft_config.base_model_name_or_path
        peft_config.base_model_name_or_path = base_ref
        try:
            model.llm.save_pretrained(str(tmp), save_embedding_layers=False)
        finally:
            peft_config.base_model_name_or_path = previous
        model.tokenizer.save_pretrained(str(tmp))
    written = [out / "adapter_config.json", out / "adapter_model.safetensors"]
    if not pretrained:
        written.append(out / "base_model")
    return written
