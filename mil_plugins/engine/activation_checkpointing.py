"""``train.gradient_checkpointing`` (HF's name): recompute the LLM's layer activations in the
backward pass instead of keeping them, trading compute for memory.

It is transformers' own ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
before transformers 5) on the base LLM (under PEFT's wrapper),
non-reentrant: the LLM's inputs are spliced embeddings, which need not require gradients (the
embedding table is frozen with LoRA), and the non-reentrant variant still gives the LoRA, the
connector and everything upstream their gradients. transformers only checkpoints in training
mode, so evaluation and generation are unchanged.
"""

from __future__ import annotations

__all__ = ["enable_gradient_checkpointing"]


def enable_gradient_checkpointing(model) -> None:
    """Turn on activation checkpointing in ``model``'s LLM (a :class:`MultimodalLM`)."""
    llm = model.base_llm()
    if not getattr(llm, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(llm).__name__} does not support "
                         f"gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
