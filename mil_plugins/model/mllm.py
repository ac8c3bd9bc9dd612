"""``MultimodalLM``: modality encoders + connector + an HF causal LM, LLaVA style.

For every modality ``m``: ``media[m] [N_m, ...] -> encoders[m] -> [N_m, T_m, D_m] -> connector(m)
-> [N_m, T_m, H]``, spliced into the LLM's input embeddings at the ``T_m`` copies of ``m``'s
placeholder token per occurrence (see :mod:`mil_plugins.model.splice`). The LLM then runs on
``inputs_embeds``; ``forward`` returns its ``CausalLMOutputWithPast`` (LM loss on ``labels``).

Batch (from ``mil_plugins.data``'s collate)::

    input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 = ignored; absent for generation),
    media {modality: Tensor [N_m, ...]}, media_kind {modality: "input" | "features"}

``"features"`` media are already-encoded ``[N_m, T_m, D_m]`` (feature cache): the encoder is skipped.

Parameters are named ``llm.*``, ``encoders.<m>.*`` and ``connector.*`` (see
:mod:`mil_plugins.model.connector` for the connector's names). What trains is the engine's/method's
choice, with one exception decided here: an encoder whose plugin options do not set
``trainable: true`` is frozen (``requires_grad=False``, run in eval mode under ``no_grad``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityPlugin
from mil_plugins.model.connector import Connector
from mil_plugins.model.decoding import Decoding, _left_align  # noqa: F401
from mil_plugins.model.layer_modules import TEXT, TokenModality, decoder_of, wrap_linears
from mil_plugins.model.splice import PlaceholderMismatchError, placeholder_mask, splice_features

MEDIA_KINDS = ("input", "features")


def _is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


class MultimodalLM(nn.Module, Decoding):
    """A LLaVA-style multimodal causal LM with any number of modalities.

    Args:
        llm: an HF causal LM (``PreTrainedModel`` with ``get_input_embeddings``), possibly
            PEFT-wrapped.
        tokenizer: its tokenizer; :meth:`add_modality` adds placeholder tokens to it.
        connector: a :class:`Connector` whose ``llm_hidden`` is the LLM's hidden size.
        plugins: modalities to add right away (``add_modality`` each, in order).

    ``build_info`` holds what :func:`mil_plugins.model.io.save_model` records about how the LLM
    was built (``llm`` source, ``lora`` config, ``dtype``); :func:`~mil_plugins.model.build.build_model`
    fills it.
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, connector: Connector,
                 plugins: list[ModalityPlugin] | None = None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.connector = connector
        self.encoders = nn.ModuleDict()
        self.plugins: dict[str, ModalityPlugin] = {}
        self.placeholder_ids: dict[str, int] = {}
        self.num_tokens: dict[str, int] = {}   # placeholder copies = tokens the connector makes
        self.enc_tokens: dict[str, int] = {}   # tokens the encoder makes
        self.build_info: dict[str, Any] = {}
        # methods' modules inside linear layers (see mil_plugins.model.layer_modules)
        self.layer_modules = nn.ModuleDict()
        self.token_modality = TokenModality()
        self._routing_hooks: set[str] = set()
        for plugin in plugins or []:
            self.add_modality(plugin)

    # ---- structure -----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Modality names, in the order they were added."""
        return list(self.plugins)

    @property
    def is_peft(self) -> bool:
        return _is_peft(self.llm)

    def base_llm(self) -> nn.Module:
        """The HF causal LM without the PEFT wrapper (LoRA layers still inside, if any)."""
        return self.llm.get_base_model() if self.is_peft else self.llm

    def add_modality(self, plugin: ModalityPlugin, encoder: ModalityEncoder | None = None,
                     projector_type: str | None = None) -> None:
        """Add a modality: placeholder token, encoder, connector entry.

        The placeholder becomes one special token of the tokenizer (reused when the tokenizer
        already has it) and the LLM's embedding matrix grows to the tokenizer's size if needed.
        ``encoder`` defaults to ``plugin.make_encoder()``; ``projector_type`` (per_modality
        connector) defaults to ``plugin.default_projector``. A connector that already has an
        entry for the modality (rebuilt from a checkpoint) keeps it.
        """
        name = plugin.name
        if name in self.plugins:
            raise ValueError(f"modality {name!r} is already part of the model")
        if not plugin.placeholder:
            raise ValueError(f"modality {name!r} has no placeholder token")
        for other, pl in self.plugins.items():
            if pl.placeholder == plugin.placeholder:
                raise ValueError(f"modality {name!r} uses placeholder {plugin.placeholder!r}, "
                                 f"already used by {other!r}")
        token_id = self._ensure_special_token(plugin.placeholder)
        if encoder is None:
            encoder = plugin.make_encoder()
        hidden, ntok = int(encoder.hidden_size), int(encoder.num_tokens)
        trainable = bool(plugin.options.get("trainable", False))
        ref = self.llm.get_input_embeddings().weight
        encoder.to(device=ref.device, dtype=ref.dtype)  # the model's device and dtype
        if not trainable:
            encoder.requires_grad_(False)
            encoder.eval()
        if name not in self.connector:
            self.connector.add_modality(name, hidden,
                                        projector_type or getattr(plugin, "default_projector", None),
                                        num_tokens=ntok)
            for module in self.connector.modules_for(name):
                module.to(device=ref.device, dtype=ref.dtype)
        elif self.connector.enc_hidden[name] != hidden:
            raise ValueError(f"modality {name!r}: encoder width {hidden} but the connector "
                             f"expects {self.connector.enc_hidden[name]}")
        self.encoders[name] = encoder
        self.plugins[name] = plugin
        self.placeholder_ids[name] = token_id
        self.enc_tokens[name] = ntok
        self.num_tokens[name] = self.connector.output_tokens(name, ntok)
        self.token_modality.names.append(name)

    def _ensure_special_token(self, token: str) -> int:
        tok = self.tokenizer
        vocab = tok.get_vocab()
        if token not in vocab:
            from transformers import AddedToken
            tok.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        token_id = tok.convert_tokens_to_ids(token)
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if list(ids) != [token_id]:
            raise ValueError(f"placeholder {token!r} does not tokenize to one token: {ids}")
        emb = self.llm.get_input_embeddings()
        if len(tok) > emb.weight.shape[0]:
            self.llm.resize_token_embeddings(len(tok), mean_resizing=False)
        return int(token_id)

    def placeholders(self) -> dict[str, tuple[int, int]]:
        """``{placeholder: (token_id, num_tokens)}`` -- what the data pipeline needs."""
        return {self.plugins[m].placeholder: (self.placeholder_ids[m], self.num_tokens[m])
                for m in self.plugins}

    def wrap_linears(self, owner: str, targets, make, scope: str = "llm") -> dict[str, nn.Module]:
        """Put ``make(name, linear)`` (a module of method ``owner``) beside every targeted linear
        layer of the LLM (``scope="llm"``; ``targets`` as PEFT's ``target_modules``: a list of
        names such as ``["q_proj", "v_proj"]`` or a regex) or of the shared connector
        (``scope="connector"``). Each module is called as ``module(x, y, route)`` with the layer's
        input, its output so far and the tokens' :class:`~mil_plugins.model.layer_modules.Route`,
        and returns the new output. Returns ``{layer name: module}``; the modules are registered
        under ``layer_modules`` (so checkpoints save them).
        """
        if scope == "llm":
            root = self.base_llm()
            if "llm" not in self._routing_hooks:
                decoder_of(root).register_forward_pre_hook(self.token_modality.on_decoder_call,
                                                           with_kwargs=True)
                self._routing_hooks.add("llm")
        elif scope == "connector":
            if self.connector.shared is None:
                raise ValueError(f"{owner}: scope 'connector' needs a shared connector "
                                 f"(model.connector.mode: shared)")
            root = self.connector.shared
            if "connector" not in self._routing_hooks:
                self.connector.register_forward_pre_hook(self.token_modality.on_connector_call)
                self._routing_hooks.add("connector")
        else:
            raise ValueError(f"scope must be 'llm' or 'connector', got {scope!r}")
        return wrap_linears(self.layer_modules, self.token_modality, scope, root, owner,
                            targets, make)

    def token_modality_map(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` long: 0 for text tokens, ``1 + i`` for placeholder tokens of
        ``modalities[i]`` (the positions its features are spliced into)."""
        ids = torch.full_like(input_ids, TEXT, dtype=torch.long)
        for i, m in enumerate(self.modalities):
            ids = ids.masked_fill(input_ids == self.placeholder_ids[m], i + 1)
        return ids

    def is_trainable_encoder(self, modality: str) -> bool:
        return bool(self.plugins[modality].options.get("trainable", False))

    def train(self, mode: bool = True) -> "MultimodalLM":
        super().train(mode)
        for m, enc in self.encoders.items():  # frozen encoders always run in eval mode
            if not self.is_trainable_encoder(m):
                enc.eval()
        return self

    # ---- compute -------------------------------------------------------------------------------
    def encode(self, modality: str, x: torch.Tensor, kind: str = "input") -> torch.Tensor:
        """Encoder features ``[N, T, D]`` of ``x`` (``kind="features"``: ``x`` already is)."""
        if modality not in self.encoders:
            raise KeyError(f"unknown modality {modality!r}; the model has {self.modalities}")
        if kind not in MEDIA_KINDS:
            raise ValueError(f"media_kind for {modality!r} must be one of {MEDIA_KINDS}, got {kind!r}")
        encoder = self.encoders[modality]
        if kind == "features":
            feats = x
        else:
            p = next(encoder.parameters(), None)
            if p is not None:
                x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
            if self.is_trainable_encoder(modality):
                feats = encoder(x)
            else:
                encoder.eval()
                with torch.no_grad():
                    feats = encoder(x)
        want = (self.enc_tokens[modality], self.connector.enc_hidden[modality])
        if feats.dim() != 3 or tuple(feats.shape[1:]) != want:
            raise ValueError(f"{modality!r} {kind}: expected features [N, {want[0]}, {want[1]}], "
                             f"got {tuple(feats.shape)}")
        return feats

    def project(self, modality: str, x: torch.Tensor, kind: str = "input") -> torch.Tensor:
        """``connector(modality, encode(modality, x, kind))``: ``[N, T, H]``."""
        return self.connector(modality, self.encode(modality, x, kind))

    def _absent_term(self, modality: str) -> torch.Tensor | None:
        """Zero scalar touching every trainable parameter of an absent modality's path."""
        terms = []
        if any(p.requires_grad for p in self.connector.parameters_for(modality)):
            terms.append(self.connector.dummy_output(modality))
        enc_params = [p for p in self.encoders[modality].parameters() if p.requires_grad]
        if enc_params:
            terms.append(sum(p.sum() for p in enc_params) * 0.0)
        return sum(terms) if terms else None

    def embed(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """LLM input embeddings ``[B, L, H]`` with every modality's projected features spliced in.

        Under autograd, a modality absent from the batch contributes ``0 * connector(zeros)``
        (and ``0 * sum(params)`` for a trainable encoder), so every trainable connector/encoder
        parameter gets a (zero) gradient on every batch, text-only ones included: DeepSpeed
        ZeRO / DDP then never wait for a gradient that does not come.
        """
        input_ids = batch["input_ids"]
        media = batch.get("media") or {}
        kinds = batch.get("media_kind") or {}
        unknown = [m for m in media if m not in self.plugins]
        if unknown:
            raise KeyError(f"batch has media for {unknown}, which the model does not have "
                           f"(modalities: {self.modalities})")
        embed_layer = self.llm.get_input_embeddings()
        input_ids = input_ids.to(embed_layer.weight.device)
        embeds = embed_layer(input_ids)
        extra = None
        for m in self.modalities:
            x = media.get(m)
            pid = self.placeholder_ids[m]
            if x is not None and len(x) > 0:
                feats = self.project(m, x, kinds.get(m, "input"))
                embeds = splice_features(embeds, input_ids, pid, feats, modality=m)
                continue
            if bool(placeholder_mask(input_ids, pid).any()):
                raise PlaceholderMismatchError(
                    f"modality {m!r}: the batch has {self.plugins[m].placeholder} placeholder "
                    f"positions but no media[{m!r}]")
            if torch.is_grad_enabled():
                term = self._absent_term(m)
                if term is not None:
                    extra = term if extra is None else extra + term
        if extra is not None:
            embeds = embeds + extra.to(embeds.dtype)
        return embeds

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens (what HF ``generate`` uses; padding -> 0)."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def forward(self, batch: Mapping[str, Any], **llm_kwargs: Any):
        """Run the LLM on :meth:`embed`; returns its ``CausalLMOutputWithPast``.

        ``loss`` is the LM cross-entropy on ``batch["labels"]`` (shifted by the LLM; -100
        ignored; placeholder positions are always ignored). Extra kwargs go to the LLM.
        """
        embeds = self.embed(batch)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        mask = mask.to(embeds.device)
        labels = batch.get("labels")
        if labels is not None:
            labels = labels.to(embeds.device)
            ids = batch["input_ids"].to(embeds.device)
            for pid in self.placeholder_ids.values():
                labels = labels.masked_fill(ids == pid, -100)
        llm_kwargs.setdefault("use_cache", False)
        llm_kwargs.setdefault("position_ids", self.position_ids(mask))
        self.token_modality.prompt = self.token_modality_map(batch["input_ids"].to(embeds.device))
        try:
            return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                            return_dict=True, **llm_kwargs)
        finally:
            self.token_modality.prompt = self.token_modality.llm = None
