"""LLaVA-original model directories (what ``LlavaLlamaForCausalLM.save_pretrained`` writes), both
ways, plus a sidecar for our other modalities.

Layout written by :func:`export_llava_dir` and :func:`save_fork`::

    config.json             LlamaConfig + LLaVA's keys: model_type "llava_llama", mm_vision_tower,
                            mm_hidden_size, mm_projector_type, mm_vision_select_layer,
                            mm_vision_select_feature, mm_patch_merge_type "flat", ...
    model.safetensors       the LLM (model.*, lm_head.weight) and model.mm_projector.*; no vision
                            tower keys (LLaVA loads the tower from mm_vision_tower): so
                            LlavaLlamaForCausalLM.from_pretrained has no missing or unexpected keys
    vision_tower/           the CLIP tower (CLIPVisionModel + CLIPImageProcessor); mm_vision_tower
                            is its absolute path (LLaVA's loader needs a path or a hub name)
    tokenizer files
    modalities/<m>/         every other modality: encoder.safetensors, plugin.json and LLaVA's
                            mm_projector.bin / .safetensors + config.json (as ``mil export``);
                            config.json's mil_sidecar_modalities lists them in index order

:func:`adopt_llava_dir` reads such a directory, or one written by LLaVA itself (as LLaVA does, the
tower comes from ``mm_vision_tower``; tower weights inside the checkpoint,
``model.vision_tower.vision_tower.*``, are used only with ``unfreeze_mm_vision_tower``), into
a :class:`~mil_plugins.model.MultimodalLM`. :func:`load_fork_modalities` gives a fork's model the
sidecar's modalities. Reading and writing need no ``llava`` import; only a fork does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from mil_plugins.model.mllm import MultimodalLM

PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
SIDECAR_KEY = "mil_sidecar_modalities"
_SELECT_FEATURE = {"default": "patch", "full": "cls_patch"}


def _llava_error(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


# -------------------------------------------------------------------------------------------------
# ours -> LLaVA directory
# -------------------------------------------------------------------------------------------------

def export_llava_dir(model: MultimodalLM, out: str | Path, vision_tower: str | None = None) -> Path:
    """Write ``model`` (its ``image`` modality must hold a CLIP tower) as a LLaVA-original
    directory (see the module docstring). ``vision_tower``: write this hub name as
    ``mm_vision_tower`` instead of saving the tower (when it is that checkpoint, unchanged)."""
    from mil_plugins.atomic import atomic_dir, atomic_save_safetensors
    from mil_plugins.model.hf_llava import llava_vision_tower

    out = Path(out).resolve()
    if "image" not in model.plugins:
        raise ValueError(f"export_llava_dir: the model has no 'image' modality ({model.modalities}); "
                         f"LLaVA's model is built around its vision tower")
    tower, layer, strategy = llava_vision_tower(model.encoders["image"])
    if type(tower).__name__ != "CLIPVisionModel":
        raise ValueError(f"export_llava_dir: LLaVA's CLIPVisionTower loads a CLIPVisionModel; the "
                         f"image tower is a {type(tower).__name__}")
    if not isinstance(layer, int):
        raise ValueError(f"export_llava_dir: LLaVA selects one layer (mm_vision_select_layer); "
                         f"the image encoder concatenates layers {layer}")
    ptype, mm_hidden, proj_state = model.connector.llava_projector_state(
        "image", fold_input_layer=model.connector.mode == "shared")
    base = model.base_llm()
    if model.is_peft:
        base = copy.deepcopy(model.llm).merge_and_unload()
    if base.config.model_type != "llama":
        raise ValueError(f"export_llava_dir: a LLaVA-original directory holds a Llama LLM "
                         f"(LlavaLlamaForCausalLM); this model's LLM is {base.config.model_type!r}")
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    state = {f"model.{k}": v for k, v in getattr(base, base.base_model_prefix).state_dict().items()}
    if not tied:
        state["lm_head.weight"] = base.get_output_embeddings().weight
    state.update({PROJECTOR_PREFIX + k: v for k, v in proj_state.items()})
    others = [m for m in model.modalities if m != "image"]

    config = base.config.to_dict()
    config.update({
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": vision_tower or str(out / "vision_tower"),
        "mm_hidden_size": int(mm_hidden), "mm_projector_type": ptype,
        "mm_vision_select_layer": int(layer), "mm_vision_select_feature": _SELECT_FEATURE[strategy],
        "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "image_aspect_ratio": "square", "tokenizer_padding_side": "right",
        SIDECAR_KEY: others,
    })
    with atomic_dir(out) as tmp:
        atomic_save_safetensors(tmp / "model.safetensors", state, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        model.tokenizer.save_pretrained(str(tmp))
        if vision_tower is None:
            tower.save_pretrained(str(tmp / "vision_tower"))
            _image_processor(model.plugins["image"], tower).save_pretrained(str(tmp / "vision_tower"))
        for m in others:
            _write_sidecar_ours(model, m, tmp / "modalities" / m)
    return out


def _image_processor(plugin, tower):
    from transformers import CLIPImageProcessor

    size = int(plugin.options.get("image_size") or tower.config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(plugin.options.get("mean") or []) or None,
                              image_std=list(plugin.options.get("std") or []) or None)


def _write_sidecar_ours(model: MultimodalLM, modality: str, target: Path) -> None:
    from mil_plugins.atomic import atomic_save_safetensors, atomic_write_json
    from mil_plugins.integrations.llava_projector import export_llava_one

    atomic_save_safetensors(target / "encoder.safetensors", model.encoders[modality].state_dict())
    atomic_write_json(target / "plugin.json", model.plugins[modality].config())
    export_llava_one(model, modality, target)


# -------------------------------------------------------------------------------------------------
# a fork's model (with our modalities) -> LLaVA directory
# -------------------------------------------------------------------------------------------------

def save_fork(model: Any, tokenizer: Any, out: str | Path) -> Path:
    """Save a fork's model that :func:`~.modalities.add_modalities` extended: the LLaVA part as
    LLaVA writes it (minus the vision tower's weights: ``mm_vision_tower`` names it), our
    modalities as the ``modalities/`` sidecar. ``LlavaLlamaForCausalLM.from_pretrained`` then
    loads it with no missing or unexpected keys; :func:`load_fork_modalities` adds the rest."""
    from mil_plugins.atomic import atomic_dir, atomic_save_safetensors, atomic_write_json
    from mil_plugins.integrations.llava_fork.modalities import CONFIG_KEY, modality_entries
    from mil_plugins.projectors.convert import save_llava_projector

    out = Path(out).resolve()
    entries = modality_entries(model)
    order = sorted(entries, key=lambda m: -int(entries[m]["index"]))
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("model.mil_encoders.", "model.mil_projectors.",
                                  "model.vision_tower."))}
    config = copy.deepcopy(model.config)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    setattr(config, SIDECAR_KEY, order)
    inner = model.get_model()
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), state_dict=state)
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for m in order:
            entry, target = entries[m], tmp / "modalities" / m
            atomic_save_safetensors(target / "encoder.safetensors", inner.mil_encoders[m].state_dict())
            atomic_write_json(target / "plugin.json", entry["plugin"])
            save_llava_projector(target, inner.mil_projectors[m].state_dict(),
                                 projector_type=entry["projector_type"],
                                 mm_hidden_size=entry["mm_hidden_size"],
                                 hidden_size=int(model.config.hidden_size),
                                 extra_config={"mm_modality": m, "mm_placeholder": entry["placeholder"],
                                               "mm_num_tokens": entry["num_tokens"],
                                               "mm_encoder": entry["plugin"]})
    return out


def _sidecars(directory: Path) -> list[tuple[str, Path]]:
    config = json.loads((directory / "config.json").read_text())
    root = directory / "modalities"
    names = config.get(SIDECAR_KEY)
    if names is None:
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    for m in names:
        for f in ("plugin.json", "encoder.safetensors", "mm_projector.bin", "config.json"):
            if not (root / m / f).is_file():
                raise _llava_error(directory, f"modality {m!r}: modalities/{m}/{f} is missing")
    return [(m, root / m) for m in names]


def _sidecar_plugin(directory: Path, name: str, folder: Path):
    from mil_plugins.plugins import MODALITIES

    entry = json.loads((folder / "plugin.json").read_text())
    if entry.get("name") != name:
        raise _llava_error(directory, f"modalities/{name}/plugin.json names {entry.get('name')!r}")
    return MODALITIES.get(name)(**(entry.get("options") or {}))


def _load_strict(module: torch.nn.Module, state: dict, what: str, directory: Path) -> None:
    ref = next(module.parameters(), None)
    if ref is not None:
        state = {k: v.to(ref.dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise _llava_error(directory, f"{what} does not fit: missing {missing}, unexpected {unexpected}")


def load_fork_modalities(model: Any, directory: str | Path) -> Any:
    """Give a fork's model (``LlavaLlamaForCausalLM.from_pretrained(directory)``) the modalities
    of ``directory/modalities/`` with their weights, at the indices they had when saved."""
    from safetensors.torch import load_file

    from mil_plugins.integrations.llava_fork.modalities import add_modalities
    from mil_plugins.projectors.convert import load_llava_config, load_projector_file

    directory = Path(directory)
    inner = model.get_model()
    for name, folder in _sidecars(directory):
        plugin = _sidecar_plugin(directory, name, folder)
        ptype = load_llava_config(folder)["mm_projector_type"]
        add_modalities(model, [plugin], projector_types={name: ptype})
        _load_strict(inner.mil_encoders[name], load_file(str(folder / "encoder.safetensors")),
                     f"modalities/{name}/encoder.safetensors", directory)
        _load_strict(inner.mil_projectors[name], load_projector_file(folder / "mm_projector.bin"),
                     f"modalities/{name}/mm_projector.bin", directory)
    return model


# -------------------------------------------------------------------------------------------------
# LLaVA directory -> ours
# -------------------------------------------------------------------------------------------------

def _checkpoint_tensors(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with ``prefix`` in the directory's checkpoint files (prefix removed)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = handle.get_tensor(key)
    if not files:
        for f in sorted(directory.glob("pytorch_model*.bin")):
            state = torch.load(f, map_location="cpu", weights_only=True)
            out.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def _tower_source(directory: Path, name: str) -> str:
    path = Path(name)
    if path.is_absolute() and path.exists():
        return str(path)
    if (directory / name).exists():
        return str(directory / name)
    return name   # a hub name (openai/clip-vit-large-patch14-336): transformers resolves it


def _quietly(load, *args, **kwargs):
    """``load`` without transformers' report of the keys the Llama does not take (LLaVA's
    mm_projector and vision tower: they are read separately)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def adopt_llava_dir(directory: str | Path, tokenizer: Any = None,
                    dtype: torch.dtype = torch.float32) -> MultimodalLM:
    """A :class:`MultimodalLM` from a LLaVA-original directory: the Llama LLM, the CLIP tower and
    ``mm_projector`` as the ``image`` modality (per-modality connector, LLaVA's projector type),
    and the sidecar's modalities, if any. ``tokenizer`` defaults to the directory's."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mil_plugins.model.connector import Connector
    from mil_plugins.model.hf_llava import CLIP_MEAN, CLIP_STD, HFVisionTowerEncoder, LlavaVisionPlugin

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: not a model directory (no config.json)")
    cfg = json.loads(config_path.read_text())
    if not cfg.get("mm_vision_tower"):
        raise _llava_error(directory, "config.json has no mm_vision_tower: not a LLaVA model directory")
    if cfg.get("mm_use_im_start_end"):
        raise _llava_error(directory, "mm_use_im_start_end=true (<im_start>/<im_end> around images) "
                                      "is not supported")
    if cfg.get("mm_patch_merge_type", "flat") != "flat" or cfg.get("image_aspect_ratio") == "anyres":
        raise _llava_error(directory, f"mm_patch_merge_type={cfg.get('mm_patch_merge_type')!r} / "
                                      f"image_aspect_ratio={cfg.get('image_aspect_ratio')!r}: only "
                                      f"LLaVA-1.5's flat image features can be adopted")
    feature = cfg.get("mm_vision_select_feature", "patch")
    strategy = {v: k for k, v in _SELECT_FEATURE.items()}.get(feature)
    if strategy is None:
        raise _llava_error(directory, f"mm_vision_select_feature {feature!r}: expected patch or cls_patch")

    llama_cfg = {k: v for k, v in cfg.items() if not k.startswith(("mm_", "mil_"))}
    llama_cfg["model_type"] = "llama"
    llama_cfg["architectures"] = ["LlamaForCausalLM"]
    llm = _quietly(LlamaForCausalLM.from_pretrained, str(directory),
                   config=LlamaConfig.from_dict(llama_cfg), dtype=dtype)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))

    tower_src = _tower_source(directory, cfg["mm_vision_tower"])
    tower = CLIPVisionModel.from_pretrained(tower_src, dtype=dtype)
    # LLaVA itself reads the tower from mm_vision_tower and ignores tower weights saved in the
    # checkpoint, unless the tower was trained (unfreeze_mm_vision_tower): do the same
    inside = _checkpoint_tensors(directory, TOWER_PREFIX) if cfg.get("unfreeze_mm_vision_tower") else {}
    if inside:
        _load_strict(tower, inside, "the checkpoint's model.vision_tower.* weights", directory)
    encoder = HFVisionTowerEncoder(tower, int(cfg.get("mm_vision_select_layer", -2)), strategy)
    processor = {}
    if (Path(tower_src) / "preprocessor_config.json").is_file():
        processor = json.loads((Path(tower_src) / "preprocessor_config.json").read_text())
    plugin = LlavaVisionPlugin(vision_config=tower.config.to_dict(),
                               vision_feature_layer=encoder.feature_layer,
                               vision_feature_select_strategy=strategy,
                               image_size=int(tower.config.image_size),
                               mean=processor.get("image_mean") or CLIP_MEAN,
                               std=processor.get("image_std") or CLIP_STD)
    ptype = cfg.get("mm_projector_type", "linear")
    model = MultimodalLM(llm, tokenizer, Connector(int(cfg["hidden_size"]), "per_modality", ptype))
    model.add_modality(plugin, encoder=encoder, projector_type=ptype)
    projector = _checkpoint_tensors(directory, PROJECTOR_PREFIX)
    if not projector:
        raise _llava_error(directory, "the checkpoint has no model.mm_projector.* weights")
    _load_strict(model.connector.projectors["image"], projector, "model.mm_projector.*", directory)

    from safetensors.torch import load_file

    from mil_plugins.projectors.convert import load_llava_config, load_projector_file

    for name, folder in _sidecars(directory):
        plugin = _sidecar_plugin(directory, name, folder)
        model.add_modality(plugin, projector_type=load_llava_config(folder)["mm_projector_type"])
        _load_strict(model.encoders[name], load_file(str(folder / "encoder.safetensors")),
                     f"modalities/{name}/encoder.safetensors", directory)
        _load_strict(model.connector.projectors[name], load_projector_file(folder / "mm_projector.bin"),
                     f"modalities/{name}/mm_projector.bin", directory)
    model.to(dtype)
    model.build_info = {"llm": {"llava_dir": str(directory)}, "lora": None,
                        "dtype": str(dtype).replace("torch.", "")}
    return model
