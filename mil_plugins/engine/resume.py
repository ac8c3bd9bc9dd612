"""What ``--resume`` checks: the recipe, the data and the tokenizer it continues with must be the
ones the checkpoint was written with.

``data_fingerprint(recipe)`` is the SHA-256 of every manifest a recipe reads (warm-up, each
stage's train and test split), keyed by the path as the recipe writes it; checkpoints store it in
``data.json``. ``resume_changes(old, new, ...)`` lists every recipe key whose value differs and
every manifest whose contents differ; :func:`check_resume` refuses with that list unless each
change is one of :data:`SAFE_CHANGES` and was allowed by name (``--allow-change KEY``). The
tokenizer is not compared but loaded from the checkpoint (never rebuilt from the current data).
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path
from typing import Any

from mil_plugins.checksums import sha256_file

#: recipe keys a resumed run may change when allowed by name: they change how a run logs, saves
#: or how fast it runs, never what it learns or how it is scored (patterns: ``*`` = any index)
SAFE_CHANGES = (
    "train.log_every_steps",
    "train.save_every_steps",
    "train.num_threads",
    "train.feature_cache",
    "train.deepspeed",
    "output.tensorboard",
    "output.report_to",
    "train.dataloader_num_workers",
    "train.gradient_checkpointing",
    "output.keep_stage_checkpoints",
    "eval.batch_size",
    "data.root",           # the folder moved: the manifests' checksums still have to match
    "data.generate",
)
#: not compared: where the recipe file was, where the run folder is (the checkpoint is read from
#: the folder given now, so a moved folder resumes), and whether the data is checked before training
IGNORED = ("_source", "output.dir", "data.preflight")


class ResumeError(ValueError):
    """A resume would continue with something other than what the checkpoint was trained on."""


def manifests_of(recipe: dict) -> list[str]:
    names = []
    if recipe.get("warmup"):
        names.append(recipe["warmup"]["train"])
    for stage in recipe["stages"]:
        names.append(stage["train"])
        if stage.get("test"):
            names.append(stage["test"])
    return list(dict.fromkeys(names))


def data_fingerprint(recipe: dict) -> dict[str, Any]:
    root = Path(recipe["data"]["root"])
    sums = {}
    for name in manifests_of(recipe):
        path = Path(name) if Path(name).is_absolute() else root / name
        sums[name] = sha256_file(path) if path.is_file() else None
    return {"manifests": sums}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)
        out[f"{prefix}.#"] = len(value)
    else:
        out[prefix] = value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recipe_changes(old: dict, new: dict) -> list[tuple[str, str]]:
    """``(key, "old -> new")`` for every differing leaf of two resolved recipes. A key that one
    recipe lacks and the other holds as null is no change: a key added to the schema later with a
    null default (``train.data_seed``) keeps the runs saved before it reusable and resumable."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    missing = object()
    changes = []
    for key in list(dict.fromkeys([*a, *b])):
        if key in IGNORED:
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if (va is missing and vb is None) or (va is None and vb is missing):
            continue
        if va != vb:
            shown_a = "(absent)" if va is missing else _short(va)
            shown_b = "(absent)" if vb is missing else _short(vb)
            label = key[:-2] + " (number of entries)" if key.endswith(".#") else key
            changes.append((label, f"{shown_a} -> {shown_b}"))
    return changes


def data_changes(old: dict | None, new: dict) -> list[tuple[str, str]]:
    if old is None:
        return []  # a checkpoint written before data.json existed: nothing recorded to compare
    a, b = old.get("manifests", {}), new.get("manifests", {})
    out = []
    for name in dict.fromkeys([*a, *b]):
        if a.get(name) != b.get(name):
            what = ("no longer readable" if b.get(name) is None else
                    "not read by the checkpoint's run" if name not in a else "contents changed")
            out.append((f"manifest {name}", what))
    return out


def is_safe(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p)
               for p in SAFE_CHANGES)


def check_resume(checkpoint: Path, old_recipe: dict, new_recipe: dict, old_data: dict | None,
                 new_data: dict, allowed: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Raise :class:`ResumeError` listing what changed; return the allowed changes (for a note)."""
    for key in allowed:
        if not is_safe(key):
            raise ResumeError(f"--allow-change {key}: this key changes what a run learns or how "
                              f"it is scored, so a resumed run cannot change it (safe to allow: "
                              f"{', '.join(SAFE_CHANGES)}); start a fresh run instead")

    def allowed_key(key: str) -> bool:
        return any(key == a or key.startswith(a + ".") for a in allowed)

    changes = recipe_changes(old_recipe, new_recipe) + data_changes(old_data, new_data)
    refused = [(k, v) for k, v in changes if not (allowed_key(k) and is_safe(k))]
    if refused:
        listing = "; ".join(f"{k}: {v}" for k, v in refused)
        safe = [k for k, _ in refused if is_safe(k)]
        hint = (f" (safe to allow with --allow-change: {', '.join(safe)})" if safe else "")
        raise ResumeError(f"--resume from {checkpoint}: {len(refused)} change(s) since the "
                          f"checkpoint was written: {listing}{hint}; resume with the same recipe "
                          f"and data, or start a fresh run (--overwrite or another output.dir)")
    return [k for k, _ in changes]


def finished_run(out: Path, recipe: dict) -> tuple[bool, str | None]:
    """Whether the run folder ``out`` holds a finished run of ``recipe`` (resolved): ``(True,
    None)`` when it may be reused as it is, ``(False, why)`` for a finished run of another recipe,
    ``(False, None)`` when nothing finished is there. Finished: ``metrics.json`` covers every stage
    (a federated run: every round). Of this recipe: its saved ``checkpoints/last/recipe.json``
    equals ``recipe`` leaf by leaf, but for the keys no run compares (:data:`IGNORED`) and the one
    key a run adds itself, the ``encoder_weights`` that ``encoder_pretraining`` writes into each
    modality's options. ``tools/compare.py`` and ``bench/probe_gap.py`` reuse runs through it."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return False, None
    expected = recipe["federated"]["rounds"] if recipe.get("federated") else len(recipe["stages"])
    try:
        completed = json.loads(metrics.read_text()).get("completed_stages")
    except (OSError, ValueError):
        return False, None
    if completed != expected:
        return False, None
    saved = out / "checkpoints" / "last" / "recipe.json"
    if not saved.is_file():
        return False, "its recipe was not saved, so it cannot be told apart from another recipe's run"
    old, new = json.loads(saved.read_text()), copy.deepcopy(recipe)
    if recipe.get("encoder_pretraining") is not None:  # given before or after pretraining ran
        for r in (old, new):
            for options in (r.get("modalities") or {}).values():
                if isinstance(options, dict):
                    options.pop("encoder_weights", None)
    changes = recipe_changes(old, new)
    if not changes:
        return True, None
    listing = "; ".join(f"{k}: {v}" for k, v in changes[:5])
    more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
    return False, f"its recipe differs from this one ({listing}{more})"
