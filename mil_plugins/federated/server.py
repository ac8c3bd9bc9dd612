"""The federated runner's server side: rounds, aggregation, evaluation, checkpoints, report.

:class:`FederatedServer` is the sibling of the stage runner (``mil_plugins.engine.run.Runner``)
over the same Session, methods, training loop (:mod:`mil_plugins.engine.steps`) and evaluation.
It does not know how clients are reached: :meth:`FederatedServer.run` takes a ``clients``
callable ``(round, [client index], {index: tensors}) -> {index: (tensors, num_samples, metrics)}``:
Flower's grid (:mod:`mil_plugins.integrations.flower`) or :class:`InProcessClients`.

Per round: pick the round's clients (``clients_per_round``, seeded), send each its view (the
warm-up's base weights, the global parameters, its personalised ones from the last aggregation,
its local ones), aggregate the replies with the recipe's aggregator, score every client's test
split with its personalised model and with the global model, checkpoint, rewrite the report.

    OUT/checkpoints/round-0001/   base / global / clients .safetensors, state.json, recipe.json,
                                  data.json, tokenizer/, checksums.json (written last, verified)
    OUT/checkpoints/last/         a copy of the newest round; ``mil federate RECIPE --resume`` goes
                                  on after the newest complete round-NNNN
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.torch import load_file

from mil_plugins.atomic import atomic_dir, atomic_save_safetensors, atomic_write_json, recover_dir
from mil_plugins.checksums import ChecksumError, verify_checksums, write_checksums
from mil_plugins.engine import checkpoint as ckpt
from mil_plugins.engine.distributed import Dist
from mil_plugins.engine.logs import JsonlLogger, report_targets
from mil_plugins.engine.resume import check_resume, data_fingerprint
from mil_plugins.engine.rundir import RunFolder
from mil_plugins.engine.session import Session
from mil_plugins.engine.loop import StagePlan
from mil_plugins.engine.steps import evaluate_samples, prepare_data, train_plan
from mil_plugins.engine.trainable import group_names
from mil_plugins.evaluate import score_predictions
from mil_plugins.federated.build import build_aggregator
from mil_plugins.federated.client import ClientTrainer, client_stage, federation_info
from mil_plugins.federated.params import is_text, load_into, snapshot
from mil_plugins.client_split import split_clients

Clients = Callable[[int, list, dict], dict]


def round_dir(root: Path, rnd: int) -> Path:
    return root / f"round-{rnd + 1:04d}"


def _split_keyed(tensors: dict, prefix: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, client, name = key.split("/", 2)
        if kind == prefix:
            out.setdefault(int(client), {})[name] = value
    return out


class InProcessClients:
    """Every client trained in this process, one after another, on the server's own model (no
    Flower: tests of the runner itself, and debugging)."""

    def __init__(self, trainer: ClientTrainer):
        self.trainer = trainer

    def __call__(self, rnd: int, chosen: list, payloads: dict) -> dict:
        return {c: self.trainer.train(c, rnd, payloads[c]) for c in chosen}


class FederatedServer:
    def __init__(self, recipe: dict, resume: bool = False, overwrite: bool = False,
                 allow_changes=()):
        if not recipe.get("federated"):
            raise ValueError("mil federate needs a recipe with a `federated:` section "
                             "(see docs/federated.md)")
        self.recipe, self.fed = recipe, recipe["federated"]
        self.dist = Dist()
        self.out = Path(recipe["output"]["dir"])
        self.ckpt_root = self.out / "checkpoints"
        self.folder = RunFolder(self.out)
        with self.folder.claim(resume=resume, overwrite=overwrite):
            self._setup(resume, allow_changes)

    def _setup(self, resume: bool, allow_changes) -> None:
        recipe = self.recipe
        prepare_data(recipe, self.dist)
        self.data = data_fingerprint(recipe)
        last = self.latest()
        loaded = self._read(last, allow_changes) if resume and last is not None else None
        if resume and loaded is None:
            print(f"[mil] --resume: no round checkpoint in {self.ckpt_root}; starting from the "
                  f"beginning")
        self.session = Session(recipe, self.dist,
                               tokenizer_dir=last / "tokenizer" if loaded else None)
        self.model, self.ctx, self.hooks = self.session.model, self.session.ctx, self.session.hooks
        self.clients = split_clients(self.fed, self.session.stages, recipe["train"]["seed"])
        self.aggregator = build_aggregator(self.fed)
        self.logger = JsonlLogger(self.out, True, report_targets(recipe["output"]),
                                  run_config={k: v for k, v in recipe.items() if k != "_source"})
        self.state: dict = {
            "round": 0, "rounds": self.fed["rounds"], "clients": [
                {"index": c.index, "name": c.name, "task": c.task, "modalities": c.modalities,
                 "train_samples": len(c.train_samples), "test_samples": len(c.test_samples)}
                for c in self.clients],
            "history": [], "warmup_seconds": None,
        }
        self.base: dict = {}
        self.global_: dict = {}
        self.personal: dict[int, dict] = {}
        self.local: dict[int, dict] = {}
        if loaded is not None:
            self.base, self.global_, self.state = loaded["base"], loaded["global"], loaded["state"]
            self.personal, self.local = loaded["personal"], loaded["local"]
            load_into(self.model, self.base)
            print(f"[mil] resuming from {last} (after round {self.state['round']})", flush=True)
        else:
            self._warmup()
        self.trainer = ClientTrainer(recipe, session=self.session, logger=self.logger)
        self.initial = dict(self.trainer.initial)

    # ---- the warm-up: the server's "pretrained" base, sent to every client -------------------
    def _warmup(self) -> None:
        w = self.recipe["warmup"]
        if not w:
            return
        train = self.recipe["train"]
        plan = StagePlan("warmup", -1, self.session.warmup_samples, w["epochs"], w["max_steps"],
                         w["lr"] if w["lr"] is not None else train["lr"], None)  # as Runner's
        names = group_names(self.model, w["trainable"], None)
        started = time.perf_counter()
        train_plan(self.session, plan, names, self.logger)
        self.state["warmup_seconds"] = time.perf_counter() - started
        self.base = snapshot(self.model, names)

    # ---- rounds ---------------------------------------------------------------------------------
    def chosen(self, rnd: int) -> list[int]:
        n, k = len(self.clients), self.fed["clients_per_round"]
        if k is None or k >= n:
            return list(range(n))
        rng = np.random.default_rng([self.recipe["train"]["seed"], rnd])
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))

    def view(self, c: int) -> dict:
        """What client ``c`` starts a round from (and is scored with)."""
        return {**self.base, **self.global_, **self.personal.get(c, {}), **self.local.get(c, {})}

    def _role(self, name: str) -> str | None:
        for m in self.hooks.methods:
            role = getattr(m, "federated_role", None)
            if callable(role) and role(name):
                return role(name)
        return None

    def aggregate(self, replies: dict) -> dict:
        order = sorted(replies)
        shared = []
        for c in order:
            tensors = replies[c][0]
            self.local[c] = {n: v for n, v in tensors.items() if self._role(n) == "local"}
            shared.append({n: v for n, v in tensors.items() if self._role(n) != "local"})
        text = {n for s in shared for n in s if is_text(n)}
        glob, personal = self.aggregator.aggregate(shared, [replies[c][1] for c in order], text)
        self.global_.update(glob)
        for c, mine in zip(order, personal):
            if mine is None:
                self.personal.pop(c, None)
            else:
                self.personal[c] = mine
        info = {}
        weights = getattr(self.aggregator, "last_weights", None)
        if weights is not None:
            info["aggregation_weights"] = {"clients": order, "matrix": weights.tolist(),
                                           "temperature": self.aggregator.last_temperature}
        return info

    def _score(self, view: dict, client, rnd: int) -> dict:
        load_into(self.model, {**self.initial, **view})
        self.ctx.federation = federation_info(client, rnd, self.fed["rounds"])
        stage = client_stage(client)
        self.ctx.stage, self.ctx.seen = stage, [stage]
        self.hooks.before_stage(stage)
        return evaluate_samples(self.session, client.test_samples,
                                f"eval {client.name}", with_rows=True)

    def evaluate(self, rnd: int) -> dict:
        """Every client's test split with its personalised model and with the global model."""
        global_view = {**self.base, **self.global_}
        out: dict = {"personalised": [], "global": [], "rows": []}
        for c in self.clients:
            if not c.test_samples:
                out["personalised"].append(None)
                out["global"].append(None)
                continue
            mine = self._score(self.view(c.index), c, rnd)
            out["personalised"].append(mine["score"])
            out["rows"].extend(mine.pop("rows"))
            same = not self.personal.get(c.index) and not self.local.get(c.index)
            out["global"].append(mine["score"] if same else  # the same model: not scored twice
                                 self._score(global_view, c, rnd)["score"])
        return out

    def run(self, clients: Clients | None = None) -> dict:
        clients = clients or InProcessClients(self.trainer)
        for rnd in range(self.state["round"], self.fed["rounds"]):
            started = time.perf_counter()
            chosen = self.chosen(rnd)
            replies = clients(rnd, chosen, {c: self.view(c) for c in chosen})
            missing = sorted(set(chosen) - set(replies))
            if missing:
                raise RuntimeError(f"round {rnd + 1}: no reply from client(s) {missing}")
            info = self.aggregate(replies)
            scores = self.evaluate(rnd)
            rows = scores.pop("rows")
            record = {"round": rnd + 1, "clients": chosen,
                      "loss": {str(c): replies[c][2].get("loss") for c in chosen},
                      "train_samples": {str(c): replies[c][1] for c in chosen},
                      **scores, "per_task": score_predictions(rows)["tasks"] if rows else {},
                      "seconds": time.perf_counter() - started, **info}
            self.state["history"].append(record)
            self.state["round"] = rnd + 1
            self.logger.log({"stage": f"round{rnd + 1}", "event": "evaluated",
                             "eval": {f"{self.clients[i].name}": s for i, s in
                                      enumerate(scores["personalised"]) if s is not None}})
            print(f"[mil] round {rnd + 1}/{self.fed['rounds']}: personalised "
                  f"{_fmt(scores['personalised'])}, global {_fmt(scores['global'])}", flush=True)
            path = round_dir(self.ckpt_root, rnd)
            self.save(path)
            ckpt.update_last(self.ckpt_root, path)
            self.write_report()
        self.logger.close()
        return self.write_report()

    # ---- checkpoints ----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete round checkpoint (``last`` may lag it by one: a kill between)."""
        rounds = sorted(p for p in self.ckpt_root.glob("round-*") if p.is_dir())
        for path in reversed(rounds):
            recover_dir(path)
            if (path / "checksums.json").is_file():
                return path
        return None

    def save(self, path: Path) -> None:
        keyed = {f"personal/{c}/{n}": v for c, s in self.personal.items() for n, v in s.items()}
        keyed.update({f"local/{c}/{n}": v for c, s in self.local.items() for n, v in s.items()})
        with atomic_dir(path) as tmp:
            atomic_save_safetensors(tmp / "base.safetensors", self.base)
            atomic_save_safetensors(tmp / "global.safetensors", self.global_)
            atomic_save_safetensors(tmp / "clients.safetensors", keyed)
            atomic_write_json(tmp / "state.json", self.state)
            atomic_write_json(tmp / "recipe.json", self.recipe)
            atomic_write_json(tmp / "data.json", self.data)
            self.session.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            write_checksums(tmp)

    def _read(self, path: Path, allow_changes) -> dict:
        recover_dir(path)
        try:
            verify_checksums(path, required=True)
        except ChecksumError as exc:
            raise ckpt.CheckpointError(str(exc)) from None
        recipe = json.loads((path / "recipe.json").read_text())
        data = json.loads((path / "data.json").read_text())
        check_resume(path, recipe, self.recipe, data, self.data, allow_changes)
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("round"), int):
            raise ckpt.CheckpointError(f"{path / 'state.json'}: no round counter")
        keyed = load_file(str(path / "clients.safetensors"))
        return {"base": load_file(str(path / "base.safetensors")),
                "global": load_file(str(path / "global.safetensors")),
                "personal": _split_keyed(keyed, "personal"), "local": _split_keyed(keyed, "local"),
                "state": state}

    # ---- report ---------------------------------------------------------------------------------
    def write_report(self) -> dict:
        from mil_plugins.federated.report import write_federated_report

        return write_federated_report(self.out, self.recipe, self.state)


def _fmt(scores: list) -> str:
    return " ".join("—" if s is None else f"{s:.1f}" for s in scores)
