"""``mil export CHECKPOINT --to llava|llava-dir|hf|peft OUT``: hand a trained stage to the LLaVA ecosystem.

``--to llava``: per modality, ``OUT/<modality>/mm_projector.bin`` (+ ``.safetensors``) with
LLaVA's keys (``model.mm_projector.0.weight`` ...) and a ``config.json`` with LLaVA's ``mm_*`` keys.
With a shared connector, the modality's input layer is folded exactly into the projector's first
linear layer, so the exported projector maps the encoder's features straight to the LLM width.

``--to llava-dir``: ``OUT/`` is a LLaVA-original directory (``LlavaLlamaForCausalLM.from_pretrained``
loads it; other modalities in ``OUT/modalities/``): :mod:`mil_plugins.integrations.llava_fork`.

``--to peft``: ``OUT/`` is the LLM's LoRA as a PEFT adapter directory
(``PeftModel.from_pretrained`` loads it): :mod:`mil_plugins.integrations.peft_adapter`.

``--to hf``: ``OUT/`` is a directory that ``LlavaForConditionalGeneration.from_pretrained`` loads
(image tower + image projector + LLM, LoRA merged); every other modality's encoder and projector is
written beside it under ``OUT/modalities/<modality>/`` (safetensors + LLaVA projector files).
"""

from __future__ import annotations

from pathlib import Path

from mil_plugins.integrations.hf_llava import export_hf
from mil_plugins.integrations.llava_projector import export_llava, export_llava_one

__all__ = ["export_checkpoint", "export_hf", "export_llava", "export_llava_one"]


def export_checkpoint(checkpoint: Path, to: str, out: Path) -> list[Path]:
    from mil_plugins.engine.loading import load_for_eval

    session = load_for_eval(checkpoint)
    if to == "llava":
        return export_llava(session.model, out)
    if to == "hf":
        return export_hf(session.model, out)
    if to == "llava-dir":
        from mil_plugins.integrations.llava_fork.checkpoint import export_llava_dir

        return [export_llava_dir(session.model, out)]
    if to == "peft":
        from mil_plugins.integrations.peft_adapter import export_peft

        return export_peft(session.model, out)
    raise ValueError(f"unknown export target {to!r}; choose llava, llava-dir, hf or peft")
