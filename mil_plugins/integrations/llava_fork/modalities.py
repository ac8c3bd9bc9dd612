"""Teach a LLaVA fork's model (a ``LlavaMetaForCausalLM``) our registered modalities.

::

    from llava.model import LlavaLlamaForCausalLM
    from mil_plugins.integrations.llava_fork import add_modalities

    model = LlavaLlamaForCausalLM.from_pretrained(...)
    add_modalities(model, {"audio": {}})           # registry names -> plugin options
    model.config.mil_modalities["audio"]["index"]  # -201: put it in input_ids where <audio> is
    out = model(input_ids=ids, labels=labels, images={"image": pixels, "audio": log_mels})
    model.generate(ids, images={"audio": log_mels}, max_new_tokens=8)

What ``add_modalities`` adds, per modality: the plugin's encoder under
``model.get_model().mil_encoders[<m>]``, a projector in LLaVA's layout built by our projector
registry (``mlp2x_gelu``: ``0.weight, 0.bias, 2.weight, 2.bias``) under ``mil_projectors[<m>]``,
and an entry in ``config.mil_modalities`` (placeholder, index, projector type, widths, plugin
config). It then replaces the model's ``prepare_inputs_labels_for_multimodal`` by a
multi-modality version. A fork that prefers a class can mix :class:`MultiModalityMixin` in
instead (``class MyFork(MultiModalityMixin, LlavaLlamaForCausalLM)``) and call
``add_modalities`` on its instances the same way.

``images`` keeps LLaVA's meaning (a tensor, or a list) and may also be a dict
``{modality: tensor [N, ...] | list of tensors}`` whose ``"image"`` entry is LLaVA's images;
``forward`` and ``generate`` of LLaVA's classes hand ``images`` through unchanged. Batches with
nothing but LLaVA's images (or none) run LLaVA's own method, so their outputs are exactly the
unmodified model's.

Items of a modality are consumed in the order its index occurs in ``input_ids``, row by row.
LLaVA's convention is kept too: when a modality has one item more per row lacking its index (the
dummy image LLaVA's data loader gives text-only samples), each such row consumes one item and
uses none of it (kept in the autograd graph, as LLaVA does).
"""

from __future__ import annotations

import types
from typing import Any, Mapping

import torch
from torch import nn

from mil_plugins.integrations.llava_fork.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mil_plugins.modality import ModalityPlugin

CONFIG_KEY = "mil_modalities"


def _is_llava_model(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("get_model", "prepare_inputs_labels_for_multimodal",
                                           "config"))


def modality_entries(model: Any) -> dict[str, dict]:
    """``config.mil_modalities`` of a fork model (``{}`` when none were added)."""
    return dict(getattr(model.config, CONFIG_KEY, None) or {})


def placeholder_indices(model: Any) -> dict[str, int]:
    """``{placeholder: index}`` for ``tokenizer_multimodal_token``: LLaVA's ``<image>: -200``
    (when the model has a vision tower) and every added modality's."""
    out = {}
    if model.get_model().get_vision_tower() is not None:
        out["<image>"] = IMAGE_TOKEN_INDEX
    for entry in modality_entries(model).values():
        out[entry["placeholder"]] = int(entry["index"])
    return out


def _plugin(name_or_plugin: str | ModalityPlugin, options: Mapping | None) -> ModalityPlugin:
    if isinstance(name_or_plugin, ModalityPlugin):
        return name_or_plugin
    from mil_plugins.plugins import MODALITIES

    return MODALITIES.get(name_or_plugin)(**dict(options or {}))


def add_modalities(model: Any, modalities: Mapping[str, Mapping | None] | list,
                   projector_type: str | None = None,
                   projector_types: Mapping[str, str] | None = None) -> Any:
    """Add modalities (registry names with their options, or plugin instances) to a LLaVA fork's
    model, in place; returns the model. See the module docstring."""
    from mil_plugins.projectors import build_projector

    if not _is_llava_model(model):
        raise TypeError(f"add_modalities: {type(model).__name__} is not a LLaVA model (it needs "
                        f"get_model() and prepare_inputs_labels_for_multimodal, as "
                        f"LlavaMetaForCausalLM has)")
    items = list(modalities.items()) if isinstance(modalities, Mapping) else [(m, None) for m in modalities]
    inner = model.get_model()
    if not hasattr(inner, "mil_encoders"):
        inner.mil_encoders = nn.ModuleDict()
        inner.mil_projectors = nn.ModuleDict()
    entries = modality_entries(model)
    ref = inner.embed_tokens.weight
    hidden = int(model.config.hidden_size)
    for name_or_plugin, options in items:
        plugin = _plugin(name_or_plugin, options)
        name = plugin.name
        if name == "image" or plugin.placeholder == "<image>":
            raise ValueError("add_modalities: 'image' is LLaVA's own vision tower and projector "
                             "(model.get_model().vision_tower / mm_projector); add other modalities")
        if name in entries:
            raise ValueError(f"add_modalities: the model already has modality {name!r}")
        taken = {e["placeholder"]: m for m, e in entries.items()}
        if plugin.placeholder in taken:
            raise ValueError(f"add_modalities: placeholder {plugin.placeholder!r} of {name!r} is "
                             f"already used by {taken[plugin.placeholder]!r}")
        encoder = plugin.make_encoder()
        ptype = (projector_types or {}).get(name) or projector_type or plugin.default_projector
        projector = build_projector(ptype, int(encoder.hidden_size), hidden)
        trainable = bool(plugin.options.get("trainable", False))
        encoder.to(device=ref.device, dtype=ref.dtype)
        projector.to(device=ref.device, dtype=ref.dtype)
        if not trainable:
            encoder.requires_grad_(False)
            encoder.eval()
        inner.mil_encoders[name] = encoder
        inner.mil_projectors[name] = projector
        index = min([IMAGE_TOKEN_INDEX] + [int(e["index"]) for e in entries.values()]) - 1
        entries[name] = {"index": index, "placeholder": plugin.placeholder,
                         "projector_type": ptype, "mm_hidden_size": int(encoder.hidden_size),
                         "num_tokens": int(encoder.num_tokens), "plugin": plugin.config()}
        setattr(model.config, CONFIG_KEY, entries)
        model._mil_plugins = {**getattr(model, "_mil_plugins", {}), name: plugin}
    bound = "prepare_inputs_labels_for_multimodal" in vars(model)
    if not isinstance(model, MultiModalityMixin) and not bound:
        llava_prepare = type(model).prepare_inputs_labels_for_multimodal
        model.prepare_inputs_labels_for_multimodal = types.MethodType(
            lambda self, *args, **kw: prepare_multimodal(
                self, types.MethodType(llava_prepare, self), *args, **kw), model)
    return model


class MultiModalityMixin:
    """Mix in before a ``LlavaMetaForCausalLM`` class to give it our modalities' input
    preparation (then call :func:`add_modalities` on an instance)."""

    def prepare_inputs_labels_for_multimodal(self, *args, **kwargs):
        return prepare_multimodal(self, super().prepare_inputs_labels_for_multimodal, *args, **kwargs)


# -------------------------------------------------------------------------------------------------
# the multi-modality input preparation
# -------------------------------------------------------------------------------------------------

def prepare_multimodal(model, llava_prepare, input_ids, position_ids, attention_mask,
                       past_key_values, labels, images, image_sizes=None):
    """``prepare_inputs_labels_for_multimodal`` with our modalities beside LLaVA's images; same
    arguments and return value as LLaVA's (``llava_prepare`` is LLaVA's own, bound)."""
    entries = modality_entries(model)
    media = dict(images) if isinstance(images, Mapping) else {"image": images}
    media = {m: x for m, x in media.items() if x is not None and len(x) > 0}
    unknown = [m for m in media if m != "image" and m not in entries]
    if unknown:
        raise KeyError(f"images has entries for {unknown}, which the model does not have "
                       f"(image and {sorted(entries)})")
    ours_in_ids = input_ids is not None and any(
        bool((input_ids == int(e["index"])).any()) for e in entries.values())
    if isinstance(images, Mapping) and not media and not ours_in_ids:
        # a text-only batch handed a dict: LLaVA's generate only passes inputs_embeds on
        embeds = model.get_model().embed_tokens(input_ids)
        return None, position_ids, attention_mask, past_key_values, embeds, labels
    if not ours_in_ids and set(media) <= {"image"}:
        out = llava_prepare(input_ids, position_ids, attention_mask, past_key_values, labels,
                            media.get("image"), image_sizes)
        return _with_absent_terms(model, out, present=set())
    if input_ids.shape[1] == 1:
        return input_ids, position_ids, attention_mask, past_key_values, None, labels

    if "image" in media and model.get_vision_tower() is None:
        raise ValueError("images has an 'image' entry but the model has no vision tower")
    features = {m: _modality_items(model, m, x, image_sizes) for m, x in media.items()}
    index_of = {"image": IMAGE_TOKEN_INDEX, **{m: int(e["index"]) for m, e in entries.items()}}

    _labels, _position_ids, _attention_mask = labels, position_ids, attention_mask
    attention_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                      else attention_mask.bool())
    if position_ids is None:
        position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    rows = [ids[mask] for ids, mask in zip(input_ids, attention_mask)]
    row_labels = [lab[mask] for lab, mask in zip(labels, attention_mask)]
    plan = _consumption_plan(rows, features, index_of)

    embed_tokens = model.get_model().embed_tokens
    cursor = {m: 0 for m in features}
    new_embeds, new_labels = [], []
    for b, (ids, lab) in enumerate(zip(rows, row_labels)):
        embeds, row_labels_out = _splice_row(b, ids, lab, embed_tokens, features, cursor, index_of,
                                             dummies=plan.get(b, ()))
        new_embeds.append(embeds)
        new_labels.append(row_labels_out)

    max_length = getattr(model.config, "tokenizer_model_max_length", None)
    if max_length is not None:
        new_embeds = [x[:max_length] for x in new_embeds]
        new_labels = [x[:max_length] for x in new_labels]
    embeds, labels_out, mask_out, pos_out = _pad(model, new_embeds, new_labels, attention_mask.dtype,
                                                 position_ids.dtype)
    out = (None,
           None if _position_ids is None else pos_out,
           None if _attention_mask is None else mask_out.to(_attention_mask.dtype),
           past_key_values, embeds,
           None if _labels is None else labels_out)
    return _with_absent_terms(model, out, present=set(features))


def _splice_row(b, ids, lab, embed_tokens, features, cursor, index_of, dummies):
    """One unpadded row: text embeddings with each negative index replaced by the next item of
    its modality (labels -100 there); ``dummies``: modalities this row consumes one unused item of."""
    is_media = ids < 0
    text_embeds = embed_tokens(ids[~is_media])
    pieces, labels = [], []
    t = start = 0
    for pos in torch.nonzero(is_media).flatten().tolist() + [len(ids)]:
        pieces.append(text_embeds[t:t + pos - start])
        labels.append(lab[start:pos])
        t += pos - start
        if pos == len(ids):
            break
        modality = _modality_of(int(ids[pos]), index_of)
        if modality not in features:
            raise ValueError(f"row {b} has a {modality!r} placeholder index {int(ids[pos])} "
                             f"but images has no {modality!r} entry")
        feats = features[modality][cursor[modality]]
        cursor[modality] += 1
        pieces.append(feats.to(text_embeds.dtype))
        labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, device=lab.device, dtype=lab.dtype))
        start = pos + 1
    for m in dummies:   # LLaVA's dummy item of a row without this modality: in the graph, unused
        pieces.append(features[m][cursor[m]][0:0].to(text_embeds.dtype))
        cursor[m] += 1
    return torch.cat([p.to(text_embeds.device) for p in pieces]), torch.cat(labels)


def _modality_of(index: int, index_of: Mapping[str, int]) -> str:
    for m, i in index_of.items():
        if i == index:
            return m
    raise ValueError(f"input_ids has the negative index {index}, which is no modality of this "
                     f"model ({dict(index_of)})")


def _consumption_plan(rows, features, index_of) -> dict[int, list[str]]:
    """Which rows consume a dummy item of which modality (LLaVA's convention), after checking
    that each modality has as many items as occurrences (or occurrences + rows without it)."""
    plan: dict[int, list[str]] = {}
    for m, items in features.items():
        counts = [int((ids == index_of[m]).sum()) for ids in rows]
        n, occurrences = len(items), sum(counts)
        if n == occurrences:
            continue
        without = [b for b, c in enumerate(counts) if c == 0]
        if n != occurrences + len(without):
            raise ValueError(f"{m}: {n} items for {occurrences} placeholder indices in input_ids "
                             f"(expected {occurrences}, or {occurrences + len(without)} with "
                             f"LLaVA's one dummy item per row without one)")
        for b in without:  # consumed in row order, between the other rows' items, as LLaVA does
            plan.setdefault(b, []).append(m)
    return plan


def _modality_items(model, modality: str, x, image_sizes) -> list[torch.Tensor]:
    """One ``[T, H]`` feature tensor per item of ``modality`` (LLM width)."""
    if modality == "image":
        return _image_items(model, x)
    inner = model.get_model()
    plugin = getattr(model, "_mil_plugins", {}).get(modality)
    if isinstance(x, (list, tuple)):
        x = plugin.collate(list(x)) if plugin is not None else torch.stack(list(x))
    encoder, projector = inner.mil_encoders[modality], inner.mil_projectors[modality]
    ref = next(encoder.parameters(), None)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else x.dtype)
    if any(p.requires_grad for p in encoder.parameters()):
        feats = encoder(x)
    else:
        encoder.eval()
        with torch.no_grad():
            feats = encoder(x)
    p = next(projector.parameters(), None)
    if p is not None:
        feats = feats.to(p.dtype)
    return list(projector(feats).unbind(0))


def _image_items(model, images) -> list[torch.Tensor]:
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    if isinstance(images, (list, tuple)) or images.ndim == 5:
        if merge != "flat":
            raise ValueError(f"mixing modalities with mm_patch_merge_type={merge!r} (LLaVA-1.6 "
                             f"anyres) is not supported; image-only batches still run LLaVA's "
                             f"own code")
        images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
        feats = model.encode_images(torch.cat(list(images), dim=0))
        split = torch.split(feats, [x.shape[0] for x in images], dim=0)
        return [f.flatten(0, 1) for f in split]
    return list(model.encode_images(images).unbind(0))


def _pad(model, embeds, labels, mask_dtype, pos_dtype):
    batch, width = len(embeds), max(x.shape[0] for x in embeds)
    ref = embeds[0]
    left = getattr(model.config, "tokenizer_padding_side", "right") == "left"
    out = torch.zeros((batch, width, ref.shape[1]), dtype=ref.dtype, device=ref.device)
    labels_out = torch.full((batch, width), IGNORE_INDEX, dtype=labels[0].dtype, device=labels[0].device)
    mask = torch.zeros((batch, width), dtype=mask_dtype, device=ref.device)
    pos = torch.zeros((batch, width), dtype=pos_dtype, device=ref.device)
    rows = []
    for i, (e, lab) in enumerate(zip(embeds, labels)):
        n = e.shape[0]
        span = slice(width - n, width) if left else slice(0, n)
        pad = torch.zeros((width - n, e.shape[1]), dtype=e.dtype, device=e.device)
        rows.append(torch.cat((pad, e) if left else (e, pad)))
        if n:
            labels_out[i, span] = lab
            mask[i, span] = True
            pos[i, span] = torch.arange(0, n, dtype=pos_dtype, device=ref.device)
    return torch.stack(rows), labels_out, mask, pos


def _with_absent_terms(model, out, present: set[str]):
    """Under autograd, add ``0 * projector(zeros)`` for every trainable modality path absent from
    the batch (LLaVA's trick, as MultimodalLM does): DeepSpeed / DDP then see a (zero) gradient
    for every trainable parameter on every batch. Values are unchanged."""
    embeds = out[4]
    if embeds is None or not torch.is_grad_enabled():
        return out
    inner = model.get_model()
    terms = []
    for m in modality_entries(model):
        if m in present:
            continue
        projector, encoder = inner.mil_projectors[m], inner.mil_encoders[m]
        trainable = [p for p in list(projector.parameters()) + list(encoder.parameters())
                     if p.requires_grad]
        if trainable:
            terms.append(sum(p.sum() for p in trainable) * 0.0)
    if not terms:
        return out
    return (*out[:4], embeds + sum(terms).to(embeds.dtype), *out[5:])
