"""LLaVA forks (code bases descending from haotian-liu/LLaVA: ``LlavaLlamaForCausalLM``,
``LlavaMetaForCausalLM``, ``llava.conversation``, ``mm_projector.bin``) and our toolkit.

- :func:`add_modalities` / :class:`MultiModalityMixin`: our registered modalities in a fork's model
  (``modalities.py``); :func:`tokenizer_multimodal_token` puts their indices in ``input_ids``.
- :func:`export_llava_dir` / :func:`adopt_llava_dir`: a :class:`~mil_plugins.model.MultimodalLM`
  as a directory that ``LlavaLlamaForCausalLM.from_pretrained`` loads, and back (``checkpoint.py``).

Conversation templates: every name of ``llava.conversation.conv_templates`` is a template of
``mil_plugins.data.templates``. See docs/llava-forks.md.
"""

from mil_plugins.integrations.llava_fork.checkpoint import (adopt_llava_dir, export_llava_dir,
                                                            load_fork_modalities, save_fork)
from mil_plugins.integrations.llava_fork.modalities import (MultiModalityMixin, add_modalities,
                                                            modality_entries, placeholder_indices)
from mil_plugins.integrations.llava_fork.tokens import (IGNORE_INDEX, IMAGE_TOKEN_INDEX,
                                                        tokenizer_multimodal_token)

__all__ = ["add_modalities", "MultiModalityMixin", "modality_entries", "placeholder_indices",
           "tokenizer_multimodal_token", "IMAGE_TOKEN_INDEX", "IGNORE_INDEX",
           "export_llava_dir", "adopt_llava_dir", "save_fork", "load_fork_modalities"]
