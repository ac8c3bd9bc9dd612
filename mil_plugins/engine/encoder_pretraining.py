"""Encoders pretrained once on labelled data of their modality (``encoder_pretraining``).

A real recipe loads pretrained towers (CLIP, BEATs, Point-BERT ...). The tiny built-in towers are
random at initialisation, and a frozen random tower keeps only what survives random features: on
the built-in benchmark a linear probe on its tokens reads 2-D shape barely above chance. As the
text warm-up stands in for a pretrained LLM, this step stands in for pretrained encoders: each
modality's encoder (built from its plugin options, as the model builds it) is trained once, with
one linear classifier per task on its concatenated tokens, to predict each sample's answer (each
distinct answer of a task is a class: QA options, and for captions each distinct caption). The
data are any LLaVA-JSON manifests of the modality; the recipes use the built-in benchmark
generated with another seed than the one they are scored on (no shared file).

The weights are kept in ``<dir>/<modality>-<key>.safetensors`` (``<key>``: a hash of the
plugin's fingerprint, the settings and the manifests' content), so they are trained once and
every run, seed and rank that asks for the same thing loads the same file; the run's recipe then
carries ``modalities.<m>.encoder_weights`` pointing at it (the model loads it through
:meth:`~mil_plugins.modality.ModalityPlugin.make_encoder`, and the feature cache keys on the
weights). A sidecar ``.json`` records the settings, the training accuracy per task and the time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mil_plugins.atomic import atomic_write_json
from mil_plugins.modality import ENCODER_WEIGHTS, ModalityPlugin

#: the settings that change the weights (part of the key; ``steps`` is the modality's own)
_KEYED = ("steps", "batch_size", "lr", "weight_decay", "seed")


def modality_settings(cfg: dict, modality: str) -> dict:
    """The training settings of one modality: ``steps_by_modality`` overrides ``steps``."""
    out = {k: cfg[k] for k in _KEYED}
    out["steps"] = int((cfg.get("steps_by_modality") or {}).get(modality, cfg["steps"]))
    return out


def _answer(sample) -> str:
    for turn in reversed(sample.conversations):
        if turn["from"] == "gpt":
            return turn["value"]
    raise ValueError(f"sample {sample.id!r} has no assistant turn to learn from")


class TaskHeads(nn.Module):
    """One linear classifier per task over the encoder's tokens, concatenated and layer-normed."""

    def __init__(self, in_features: int, classes: dict[str, list[str]]):
        super().__init__()
        self.tasks = list(classes)
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(in_features),
                                                 nn.Linear(in_features, len(c)))
                                   for c in classes.values())

    def loss(self, feats: torch.Tensor, task: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch, each sample through its own task's head."""
        flat = feats.flatten(1)
        total = flat.new_zeros(())
        for i, head in enumerate(self.heads):
            sel = task == i
            if sel.any():
                total = total + nn.functional.cross_entropy(head(flat[sel]), label[sel],
                                                            reduction="sum")
        return total / max(1, len(task))

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, task: torch.Tensor, label: torch.Tensor) -> dict:
        flat = feats.flatten(1)
        out = {}
        for i, head in enumerate(self.heads):
            sel = task == i
            if sel.any():
                out[self.tasks[i]] = round(100.0 * (head(flat[sel]).argmax(-1) == label[sel])
                                           .float().mean().item(), 2)
        return out


def labelled_inputs(plugin: ModalityPlugin, samples: list) -> tuple[list, torch.Tensor,
                                                                    torch.Tensor, dict]:
    """Preprocessed inputs, task index, class index and ``{task: [classes]}`` of ``samples``
    (tasks with fewer than two distinct answers teach nothing and are left out)."""
    key = plugin.manifest_key
    answers: dict[str, set] = {}
    for s in samples:
        answers.setdefault(s.task or "default", set()).add(_answer(s))
    classes = {t: sorted(a) for t, a in sorted(answers.items()) if len(a) > 1}
    if not classes:
        raise ValueError(f"encoder_pretraining for {plugin.name!r}: no task with two or more "
                         f"distinct answers in its {len(samples)} samples")
    tasks = list(classes)
    inputs, task_idx, label_idx = [], [], []
    for s in samples:
        t = s.task or "default"
        if t not in classes:
            continue
        for path in s.media.get(key, []):
            try:
                inputs.append(plugin.preprocess(path))
            except ValueError as exc:
                raise ValueError(f"encoder_pretraining: sample {s.id!r}: {exc}") from None
            task_idx.append(tasks.index(t))
            label_idx.append(classes[t].index(_answer(s)))
    return inputs, torch.tensor(task_idx), torch.tensor(label_idx), classes


def pretrain_encoder(plugin: ModalityPlugin, samples: list, settings: dict) -> tuple[dict, dict]:
    """Train the encoder ``plugin`` builds on ``samples``; ``(state_dict, info)``. Runs on one
    CPU thread, so the weights are the same bits in any process (``workers`` runs several)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(plugin, samples, settings)
    finally:
        torch.set_num_threads(threads)


def _pretrain(plugin: ModalityPlugin, samples: list, settings: dict) -> tuple[dict, dict]:
    """Seeded AdamW + one-cycle schedule on random batches; then the training accuracy per task."""
    t0 = time.time()
    inputs, task, label, classes = labelled_inputs(plugin, samples)
    gen = torch.Generator().manual_seed(int(settings["seed"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(settings["seed"]))
        encoder = plugin.build_encoder().float()  # a fresh build: the plugin keeps nothing
        encoder.requires_grad_(True).train()
        with torch.no_grad():
            probe = encoder(plugin.collate(inputs[:2]))
        heads = TaskHeads(probe.shape[1] * probe.shape[2], classes)
        params = list(encoder.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=float(settings["lr"]),
                                weight_decay=float(settings["weight_decay"]))
        steps, bs = int(settings["steps"]), min(int(settings["batch_size"]), len(inputs))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(settings["lr"]),
                                                    total_steps=steps, pct_start=0.1)
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(inputs), (bs,), generator=gen)
            x = plugin.collate([inputs[i] for i in idx.tolist()])
            loss = heads.loss(encoder(x), task[idx], label[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    encoder.eval()
    accuracy: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(inputs), 64):
            sl = slice(start, start + 64)
            acc = heads.accuracy(encoder(plugin.collate(inputs[sl])), task[sl], label[sl])
            for t, a in acc.items():
                accuracy.setdefault(t, []).append((a, int((task[sl] == heads.tasks.index(t)).sum())))
    train_acc = {t: round(sum(a * n for a, n in v) / sum(n for _, n in v), 2)
                 for t, v in accuracy.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tail = losses[-max(1, steps // 10):]
    info = {"samples": len(inputs), "classes": {t: len(c) for t, c in classes.items()},
            "final_loss": round(sum(tail) / len(tail), 4), "train_accuracy": train_acc,
            "seconds": round(time.time() - t0, 1)}
    return state, info


def weights_key(plugin: ModalityPlugin, settings: dict, manifests: list[Path]) -> str:
    """What determines the pretrained weights: plugin identity (code, options), settings, data."""
    from mil_plugins.cache import content_hash

    identity = {"plugin": plugin.fingerprint(), "settings": settings,
                "manifests": [content_hash(p) for p in manifests]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _plugin_without_weights(modality: str, options: dict) -> ModalityPlugin:
    from mil_plugins.plugins import MODALITIES

    opts = {k: v for k, v in (options or {}).items() if k != ENCODER_WEIGHTS}
    return MODALITIES.get(modality)(**opts)


def pretrained_weights(recipe: dict, modality: str, log=print) -> Path:
    """The weights file of ``modality`` under the recipe's ``encoder_pretraining``, trained and
    written (atomically) if it is not there yet."""
    from safetensors.torch import save_file

    from mil_plugins.data.manifest import load_manifests

    cfg = recipe["encoder_pretraining"]
    root = Path(cfg["data"]["root"])
    plugin = _plugin_without_weights(modality, recipe["modalities"].get(modality))
    manifests = [root / m.format(modality=modality) for m in cfg["manifests"]]
    settings = modality_settings(cfg, modality)
    key = weights_key(plugin, settings, manifests)
    out_dir = Path(cfg["dir"]) if cfg["dir"] else root / "encoders"
    target = out_dir / f"{modality}-{key}.safetensors"
    if target.is_file():
        return target
    samples = list(load_manifests(manifests, root, {modality: plugin}, on_error="raise").samples)
    log(f"[mil] encoder_pretraining {modality}: {len(samples)} samples, {settings['steps']} steps")
    state, info = pretrain_encoder(plugin, samples, settings)
    log(f"[mil] encoder_pretraining {modality}: train accuracy {info['train_accuracy']} "
        f"({info['seconds']} s)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{time.time_ns()}.tmp")
    save_file(state, str(tmp))
    tmp.replace(target)
    atomic_write_json(target.with_suffix(".json"), {
        "modality": modality, "plugin_fingerprint": plugin.fingerprint(),
        "settings": settings, "manifests": [str(m) for m in manifests], **info})
    return target


def apply_encoder_pretraining(recipe: dict, dist=None, log=print) -> dict:
    """Point ``modalities.<m>.encoder_weights`` of every modality the recipe pretrains at its
    weights (training them on the main rank first when missing); the recipe is changed in place
    and returned. A modality whose recipe already names ``encoder_weights`` is left alone."""
    cfg = recipe.get("encoder_pretraining")
    if not cfg:
        return recipe
    stage_modalities = [s["modality"] for s in recipe["stages"] if s.get("modality")]
    wanted = cfg["modalities"] if cfg["modalities"] is not None else list(dict.fromkeys(stage_modalities))
    wanted = [m for m in wanted if ENCODER_WEIGHTS not in (recipe["modalities"].get(m) or {})]
    if dist is None or dist.is_main:
        gen = cfg["data"]["generate"]
        if gen is not None:
            from mil_plugins.benchmark import make_benchmark
            make_benchmark(Path(cfg["data"]["root"]), size=gen["size"], seed=gen["seed"],
                           sequence=gen.get("sequence", "modality"), modalities=wanted)
        _train_missing(recipe, wanted, log)
    if dist is not None:
        dist.barrier()
    for m in wanted:  # every rank computes the same key, so the same file
        recipe["modalities"].setdefault(m, {})
        recipe["modalities"][m] = {**(recipe["modalities"][m] or {}),
                                   ENCODER_WEIGHTS: str(pretrained_weights(recipe, m, log))}
    return recipe


def _train_one(recipe: dict, modality: str) -> str:
    torch.set_num_threads(1)
    return str(pretrained_weights(recipe, modality, log=lambda *a: print(*a, flush=True)))


def _train_missing(recipe: dict, modalities: list[str], log) -> None:
    """Train the missing weights, ``encoder_pretraining.workers`` modalities at a time (processes;
    each is seeded on its own, so the weights do not depend on the number of workers)."""
    workers = min(int(recipe["encoder_pretraining"]["workers"]), len(modalities))
    if workers <= 1:
        for m in modalities:
            pretrained_weights(recipe, m, log)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    clean = {k: v for k, v in recipe.items() if k != "_source"}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for future in [pool.submit(_train_one, clean, m) for m in modalities]:
            future.result()  # re-raises a worker's error (it names the modality / sample)
