"""Read a recipe: YAML (safe loader) -> ``extends`` merged -> ``key=value`` overrides -> validated.

Validation happens before anything is built: unknown keys, wrong types, bad choices, unknown
modality / projector / method names (with the registered choices and a close match) and invalid
plugin options are reported with the file and the key path (``stages.1.lr``).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from mil_plugins.recipe import schema as S
from mil_plugins.recipe.errors import RecipeError
from mil_plugins.recipe.hf_names import canonical_key, canonical_names, normalize_report_to
from mil_plugins.recipe.yaml_safe import RecipeYAMLError, load_yaml


# ---- reading ---------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(path, "", "recipe file not found") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(path, "", f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    except IsADirectoryError:
        raise RecipeError(path, "", "is a directory, not a recipe file") from None
    try:
        data = load_yaml(text)
    except RecipeYAMLError as exc:
        raise RecipeError(path, "", str(exc)) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise RecipeError(path, "", "invalid YAML: " + " ".join(str(exc).split())) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, "", "a recipe must be a mapping of sections")
    return data


REPLACE = "_replace_"


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` wins; mappings merge recursively, everything else (lists too) is replaced. A
    mapping of ``over`` holding ``_replace_: true`` replaces the base's mapping whole instead of
    merging into it (as OpenMMLab configs' ``_delete_``): ``steps_by_modality: {_replace_: true,
    image: 1000}`` drops the keys the parent set for other modalities."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key == REPLACE:
            continue
        replace = isinstance(value, dict) and value.get(REPLACE) is True
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not replace:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _without_replace(value)
    return out


def _without_replace(value: Any) -> Any:
    """``value`` with every ``_replace_`` marker removed (a recipe that extends nothing may carry
    them too; they never reach validation or the saved recipe)."""
    if isinstance(value, dict):
        return {k: _without_replace(v) for k, v in value.items() if k != REPLACE}
    if isinstance(value, list):
        return [_without_replace(v) for v in value]
    return copy.deepcopy(value)


def read_with_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in _seen:
        raise RecipeError(path, "extends", "circular extends: " + " -> ".join(map(str, _seen + (path,))))
    data = canonical_names(_read_yaml(path), path)  # HF TrainingArguments names -> ours
    parent = data.pop("extends", None)
    if parent is None:
        return _without_replace(data)
    if not isinstance(parent, str):
        raise RecipeError(path, "extends", "must be a path (relative to this file)")
    return deep_merge(read_with_extends(path.parent / parent, _seen + (path,)), data)


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply ``a.b.0.c=value`` overrides; values are parsed as YAML scalars/lists."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(source, item, "an override must look like key.path=value")
        key, raw = item.split("=", 1)
        key = canonical_key(key)
        parts = key.split(".")
        if not key.strip() or any(not p.strip() for p in parts):
            raise RecipeError(source, item, "an override must look like key.path=value (the key "
                                            "path is empty or has an empty part)")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except (yaml.YAMLError, RecipeYAMLError) as exc:
            raise RecipeError(source, key, "cannot parse value "
                              f"{raw!r}: " + " ".join(str(exc).split())) from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = node[_index(node, part, source, here)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise RecipeError(source, key, f"{here.rsplit('.', 1)[0]} is a value, not a "
                                               f"mapping or a list")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, source, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(source, key, "cannot set a key inside a non-mapping value")
    return data


def _index(node: list, part: str, source: str, key: str) -> int:
    try:
        i = int(part)
        node[i]
        return i
    except (ValueError, IndexError):
        raise RecipeError(source, key, f"{part!r} is not an index of a list of {len(node)}") from None


# ---- validation against the schema ---------------------------------------------------------------

def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    if isinstance(t, S.Optional):
        return _type_name(t.types if len(t.types) > 1 else t.types[0]) + " or null"
    if isinstance(t, S.ListOf):
        return f"list of {_type_name(t.item)}"
    if isinstance(t, S.MapOf):
        return f"mapping of {_type_name(t.value)}"
    if isinstance(t, dict):
        return "mapping"
    return getattr(t, "__name__", str(t))


def _check(value: Any, spec: Any, source: str, path: str) -> Any:
    """Validate ``value`` against ``spec`` and return it with defaults filled in."""
    if isinstance(spec, S.Optional):
        if value is None:
            return None
        spec = spec.types if len(spec.types) > 1 else spec.types[0]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise RecipeError(source, path, f"expected a mapping, got {type(value).__name__}")
        return _check_section(value, spec, source, path)
    if isinstance(spec, S.ListOf):
        if not isinstance(value, list):
            raise RecipeError(source, path, f"expected a list, got {type(value).__name__}")
        return [_check(v, spec.item, source, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(spec, S.MapOf):
        if not isinstance(value, dict):
            raise RecipeError(source, path, f"expected a mapping, got {type(value).__name__}")
        return {k: _check({} if v is None and spec.value is dict else v, spec.value, source,
                          f"{path}.{k}") for k, v in value.items()}
    types = spec if isinstance(spec, tuple) else (spec,)
    if bool in types or not isinstance(value, bool):
        if isinstance(value, types):
            return value
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in types and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise RecipeError(source, path, f"expected {_type_name(spec)}, got {value!r}")


def _check_section(data: dict, section: dict, source: str, path: str) -> dict:
    out = {}
    for key in data:
        if key not in section:
            close = difflib.get_close_matches(str(key), list(section), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(source, _join(path, key),
                              f"unknown key{hint}; valid keys: {', '.join(section)}")
    for key, (spec, default) in section.items():
        here = _join(path, key)
        if key not in data:
            if default is S.REQUIRED:
                raise RecipeError(source, here, "missing required key")
            out[key] = _check(copy.deepcopy(default), spec, source, here)
            continue
        out[key] = _check(data[key], spec, source, here)
        choices = S.CHOICES.get(tuple(here.split(".")))
        if choices and out[key] is not None and out[key] not in choices:
            raise RecipeError(source, here, f"{out[key]!r} is not one of {', '.join(choices)}")
        _check_value(out[key], source, here)
    return out


def _pattern(path: str) -> tuple[str, ...]:
    return tuple("*" if part.isdigit() else part for part in path.split("."))


def _check_value(value: Any, source: str, path: str) -> None:
    """Numbers: finite and in the key's range; strings the schema needs non-empty: non-empty."""
    key = _pattern(path)
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(source, path, f"{value!r} is not a finite number")
    rng = S.RANGES.get(key)
    if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not rng.contains(value):
            raise RecipeError(source, path, f"{value!r} is out of range; allowed: {rng.describe()}")
    if key in S.NON_EMPTY and isinstance(value, str) and not value.strip():
        raise RecipeError(source, path, "must not be empty")
    if key == ("stages", "*", "name") and not re.fullmatch(S.NAME_PATTERN, value):
        raise RecipeError(source, path, f"stage name {value!r} must be letters, digits, '_', '.' "
                                        f"or '-' (it names the stage's checkpoint folder)")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ---- registry-aware checks -----------------------------------------------------------------------

def _check_names(recipe: dict, source: str) -> None:
    from mil_plugins.methods.base import check_composition
    from mil_plugins.plugins import METHODS, MODALITIES
    from mil_plugins.projectors import resolve_projector
    from mil_plugins.registry import PluginError

    def get(registry, name, key):
        try:
            return registry.get(name)
        except PluginError as exc:
            raise RecipeError(source, key, str(exc)) from None

    for name, options in recipe["modalities"].items():
        plugin_cls = get(MODALITIES, name, f"modalities.{name}")
        try:
            plugin_cls(**(options or {}))
        except (ValueError, TypeError) as exc:
            raise RecipeError(source, f"modalities.{name}", str(exc)) from None

    connector = recipe["model"]["connector"]
    types = dict(connector["projector_types"])
    if connector["projector_type"]:
        types["(default)"] = connector["projector_type"]
    for key, ptype in types.items():
        try:
            resolve_projector(ptype)
        except PluginError as exc:
            where = "model.connector." + ("projector_type" if key == "(default)"
                                          else f"projector_types.{key}")
            raise RecipeError(source, where, str(exc)) from None

    seen_names = set()
    for i, stage in enumerate(recipe["stages"]):
        if stage["name"] in seen_names:
            raise RecipeError(source, f"stages.{i}.name", f"duplicate stage name {stage['name']!r}")
        seen_names.add(stage["name"])
        modality = stage["modality"]
        if modality is not None and modality not in recipe["modalities"]:
            get(MODALITIES, modality, f"stages.{i}.modality")  # unknown name -> registry message
            raise RecipeError(source, f"stages.{i}.modality",
                              f"modality {modality!r} has no entry in the modalities section "
                              f"(add `modalities: {{{modality}: {{}}}}` to use its defaults)")
        for j, group in enumerate(stage["trainable"] or []):
            _check_group(group, source, f"stages.{i}.trainable.{j}")
    if not recipe["stages"]:
        raise RecipeError(source, "stages", "a recipe needs at least one stage")
    for j, group in enumerate(recipe["train"]["trainable"]):
        _check_group(group, source, f"train.trainable.{j}")

    methods = []
    for i, spec in enumerate(recipe["methods"]):
        cls = get(METHODS, spec["name"], f"methods.{i}.name")
        try:
            methods.append(cls(**spec["options"]))
        except (ValueError, TypeError) as exc:
            raise RecipeError(source, f"methods.{i}.options", str(exc)) from None
    try:
        check_composition(methods)
    except ValueError as exc:
        raise RecipeError(source, "methods", str(exc)) from None

    fed = recipe.get("federated")
    if fed:  # `mil federate` (docs/federated.md)
        from mil_plugins.plugins import AGGREGATORS

        aggregator = get(AGGREGATORS, fed["aggregator"], "federated.aggregator")
        try:
            aggregator(**fed["aggregator_options"])
        except (ValueError, TypeError) as exc:
            raise RecipeError(source, "federated.aggregator_options", str(exc)) from None
        if fed["clients_per_round"] is not None and fed["clients_per_round"] > fed["clients"]:
            raise RecipeError(source, "federated.clients_per_round",
                              f"{fed['clients_per_round']} is more than federated.clients "
                              f"({fed['clients']})")

    llm = recipe["model"]["llm"]
    if sum(llm[k] is not None for k in ("pretrained", "config", "llava")) != 1:
        raise RecipeError(source, "model.llm", "give exactly one of `pretrained` (a causal LM hub "
                          "id or directory), `config` (build from config) or `llava` (adopt a "
                          "LlavaForConditionalGeneration checkpoint)")
    tok = recipe["model"]["tokenizer"]
    if not tok["build_from_data"] and not (tok["pretrained"] or llm["pretrained"] or llm["llava"]):
        raise RecipeError(source, "model.tokenizer", "a model built from config needs "
                          "`tokenizer.pretrained` or `tokenizer.build_from_data: true`")
    if recipe["model"]["lora"] is None and "lora" in _all_groups(recipe):
        raise RecipeError(source, "train.trainable", "'lora' is trainable but model.lora is not set")


def _all_groups(recipe: dict) -> set[str]:
    groups = set(recipe["train"]["trainable"])
    for stage in recipe["stages"]:
        groups |= set(stage["trainable"] or [])
    if recipe["warmup"]:
        groups |= set(recipe["warmup"]["trainable"])
    return groups


def _check_group(group: str, source: str, key: str) -> None:
    if group not in S.TRAINABLE_GROUPS:
        close = difflib.get_close_matches(group, S.TRAINABLE_GROUPS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(source, key, f"unknown trainable group {group!r}{hint}; valid: "
                                       f"{', '.join(S.TRAINABLE_GROUPS)}")


def _check_scheduler(recipe: dict, source: str) -> None:
    """The scheduler type with its ``lr_scheduler_kwargs`` builds (on a dummy optimiser)."""
    from mil_plugins.optim import check_scheduler

    try:
        check_scheduler(recipe["train"])
    except (ValueError, TypeError) as exc:
        raise RecipeError(source, "train.lr_scheduler_kwargs", " ".join(str(exc).split())) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read, merge, override and validate a recipe; returns the full recipe with defaults."""
    path = Path(path)
    data = read_with_extends(path)
    data = canonical_names(apply_overrides(data, overrides or []), path)  # e.g. train={...HF names}
    if isinstance(data.get("output"), dict) and "report_to" in data["output"]:
        data["output"]["report_to"] = normalize_report_to(data["output"]["report_to"], path)
    recipe = _check_section(data, {k: v for k, v in S.RECIPE.items() if k != "extends"},
                            str(path), "")
    _check_names(recipe, str(path))
    _check_scheduler(recipe, str(path))
    recipe["_source"] = str(path)
    return recipe
