"""The modality plugin interface: what a package must provide to add a modality.

A modality plugin is a subclass of :class:`ModalityPlugin`, published through an entry point in the
``mil_plugins.modalities`` group. It says which manifest key and placeholder token it uses, turns a
file into a tensor (``preprocess``; it runs in CPU ``DataLoader`` workers when the recipe sets
``train.dataloader_num_workers``) and builds the encoder that turns
a batch of such tensors into token features ``[B, T, D]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mil_plugins.registry import merge_options


#: an option every modality plugin takes besides its own: a safetensors file holding the state
#: dict of the encoder its options build (written by ``encoder_pretraining``, see
#: :mod:`mil_plugins.engine.encoder_pretraining`, or by any code that saves ``encoder.state_dict()``)
ENCODER_WEIGHTS = "encoder_weights"


def load_encoder_weights(encoder: nn.Module, path: str | Path, modality: str,
                         what: str = "encoder_weights",
                         hint: str = "were they saved with other options?") -> None:
    """Load ``path`` (safetensors) into ``encoder`` strictly; one clear error naming the file
    (``what``: the option it came from; ``hint``: what to check when the shapes do not fit)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"modality {modality!r}: {what} {p} not found")
    try:
        state = load_file(str(p))
    except Exception as exc:
        raise ValueError(f"modality {modality!r}: cannot read {what} {p} "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"modality {modality!r}: {what} {p} do not fit the encoder its options "
                         f"build ({hint}): {' '.join(first[:3])}") from None


class ModalityInputError(ValueError):
    """A file cannot be used as input of a modality. The message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str, modality: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.modality = modality
        where = f"{modality} input " if modality else ""
        super().__init__(f"{where}{self.path}: {problem}")


class ModalityEncoder(nn.Module):
    """Base of every modality encoder: ``forward(x [B, ...]) -> features [B, num_tokens, hidden_size]``."""

    hidden_size: int
    num_tokens: int


class ModalityPlugin:
    """A modality: manifest key, placeholder, preprocessor and encoder factory.

    Subclasses set the class attributes and implement :meth:`preprocess` and :meth:`build_encoder`.
    ``options`` come from the recipe (``modalities.<name>``) and must be JSON-serialisable; they are
    saved with checkpoints so that a model can be rebuilt exactly.
    """

    name: ClassVar[str] = ""            # registry name, e.g. "audio"
    key: ClassVar[str] = ""             # manifest key, e.g. "audio" (defaults to ``name``)
    placeholder: ClassVar[str] = ""     # placeholder token in conversations, e.g. "<audio>"
    default_projector: ClassVar[str] = "mlp2x_gelu"
    extensions: ClassVar[tuple[str, ...]] = ()   # file suffixes it reads, for error messages
    default_options: ClassVar[dict[str, Any]] = {}
    #: a label for the preprocessing and encoder behaviour, part of the feature-cache key. The
    #: plugin's code is part of the key too (:func:`mil_plugins.plugin_code.code_fingerprint`), so
    #: an edit to the source already invalidates cached features; bump ``version`` when the output
    #: changes without a source edit here (an upgraded library the plugin calls, a data file it reads)
    version: ClassVar[str] = "1"

    def __init__(self, **options: Any):
        weights = options.pop(ENCODER_WEIGHTS, None)
        self.options: dict[str, Any] = merge_options("modality", self.name, self.default_options,
                                                     options)
        if weights is not None:  # only present when set, so other plugins' cache keys stay as they were
            self.options[ENCODER_WEIGHTS] = str(weights)

    # -- to implement ----------------------------------------------------------------------------
    def preprocess(self, path: str | Path) -> torch.Tensor:
        """Read one file and return the encoder's input tensor (no batch dimension).

        Raises :class:`ModalityInputError` naming the file and the problem; never returns a silent
        zero tensor for unreadable input.
        """
        raise NotImplementedError

    def build_encoder(self) -> ModalityEncoder:
        """The encoder for this modality, configured by ``self.options``."""
        raise NotImplementedError

    # -- provided --------------------------------------------------------------------------------
    def make_encoder(self) -> ModalityEncoder:
        """:meth:`build_encoder`, then the weights of the ``encoder_weights`` option if it is set
        (what the model and the integrations call)."""
        encoder = self.build_encoder()
        path = self.options.get(ENCODER_WEIGHTS)
        if path:
            load_encoder_weights(encoder, path, self.name)
        return encoder

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Batch preprocessed tensors for the encoder (default: stack; all same shape)."""
        return torch.stack(tensors, 0)

    @property
    def manifest_key(self) -> str:
        return self.key or self.name

    def config(self) -> dict[str, Any]:
        """What identifies this plugin's preprocessing + encoder: saved with checkpoints, cache key."""
        return {"name": self.name, "options": self.options}

    def fingerprint(self) -> str:
        """Feature-cache identity: the plugin class, its ``version``, a hash of its code (its
        module and the modules of its package that it imports) and its config."""
        from mil_plugins.plugin_code import code_fingerprint

        identity = {**self.config(), "class": f"{type(self).__module__}:{type(self).__qualname__}",
                    "version": self.version, "code": code_fingerprint(type(self))}
        blob = json.dumps(identity, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_modality_plugin(name: str, obj: Any) -> None:
    """Registry check: a modality entry point must name a ModalityPlugin subclass."""
    if not (isinstance(obj, type) and issubclass(obj, ModalityPlugin)):
        raise TypeError(f"expected a subclass of mil_plugins.modality.ModalityPlugin, got {obj!r}")
    for attr in ("name", "placeholder"):
        if not getattr(obj, attr):
            raise TypeError(f"{obj.__name__} does not set the class attribute {attr!r}")
    if obj.name != name:
        raise TypeError(f"{obj.__name__}.name is {obj.name!r} but its entry point is named {name!r}")
