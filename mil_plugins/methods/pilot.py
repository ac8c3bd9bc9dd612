"""``pilot``: Pilot's connector for federated multimodal instruction tuning.

Xiong et al., 2025, "Pilot: Building the Federated Multimodal Instruction Tuning Framework"
(AAAI 2025, arXiv 2501.13985; released fine-tuning code MightXiong/FedMIT). Only meaningful under
``mil federate`` (a recipe with a ``federated`` section), whose server side is the ``pilot``
aggregator (:mod:`mil_plugins.federated.aggregators`); see ``docs/federated.md``. In a stage-by-
stage recipe (``mil train``) each stage is a task with its own branch beside one shared client
branch (stage 1 only: there are no rounds).

Beside every linear layer of the shared connector's projector ``W`` (``wrap_linears``, scope
``connector``) sit, per task key ``t`` of the federation (one per client group, from the split),
a *task branch* ``T_t`` and one *client branch* ``C``, each a bottleneck adapter
``U(D x)`` (``U`` zero-initialised, so the projector starts as it was), and a gate ``G``::

    stage 1 ("adapter on adapter"):   y = W x + T_t(x) + C(x)            t = the client's task
        loss  orth * mean((X1^T X2)^2)     X1, X2: per-sample flattened, L2-normalised outputs of
                                           T_t and C at the projector's last layer (DiffLoss, 0.1)
    stage 2 (CT-MoA):                 y = W x + sum_e g_e(x) T_e(x) + C(x)
        g(x) = softmax(x G)  per token, over every task's branch (the experts); G zero-initialised
        loss  balance * E^2 mean(mean_softmax * top1_fraction)    (0.1)
              + z * mean(logsumexp(x G)^2)                        (router z-loss, 0.01)

Stage 2 starts at round ``moa_from_round`` (1-based; default ``rounds // 2 + 1``, so 4 rounds are
2 + 2); with a single task there is nothing to mix and stage 1 goes on. Each client
trains its own task branch, the client branch, the gate (stage 2) and what the recipe's
``train.trainable`` names; other tasks' branches reach it from the server frozen, so a task's
expert is averaged only over the clients of that task while every client learns to use them
(``federated_role``: the client branch never leaves the client's slot on the server).

Differences from the released code: branches are zero-initialised bottleneck adapters beside
each projector layer, not full MLP copies initialised from the pretrained projector; the experts
of stage 2 are the task branches of stage 1 (the released code builds new experts); all experts
are used (top-k = E, as the released scripts set).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mil_plugins.methods.base import Method

NAME = "pilot"
TAG = f".modules_by_owner.{NAME}."


def _safe(key: str) -> str:
    """A task key as a ModuleDict key (no dots)."""
    return key.replace(".", "_")


class Branch(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank)
        self.up = nn.Linear(rank, d_out)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class PilotState:
    """What every layer reads: the client's task, the stage, and what training forwards record."""

    def __init__(self) -> None:
        self.task: str | None = None
        self.phase = 1
        self.branches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gate_logits: list[torch.Tensor] = []


class PilotLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, tasks: list[str], state: PilotState,
                 record: bool):
        super().__init__()
        self.keys = [_safe(t) for t in tasks]
        self.task = nn.ModuleDict({k: Branch(d_in, d_out, rank) for k in self.keys})
        self.client = Branch(d_in, d_out, rank)
        self.gate = nn.Linear(d_in, len(self.keys), bias=False)
        nn.init.zeros_(self.gate.weight)
        self.state, self.record = state, record

    def forward(self, x: torch.Tensor, y: torch.Tensor, route) -> torch.Tensor:
        st = self.state
        if st.task is None:
            return y
        c = self.client(x)
        if st.phase == 1:
            t = self.task[_safe(st.task)](x)
            if self.training and self.record:
                st.branches.append((t, c))
            return y + (t + c).to(y.dtype)
        logits = self.gate(x)
        w = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        experts = torch.stack([self.task[k](x) for k in self.keys], -1)
        if self.training:
            st.gate_logits.append(logits)
        return y + ((experts * w.unsqueeze(-2)).sum(-1) + c).to(y.dtype)


def diff_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean((A^T B)^2)`` of per-sample flattened, L2-normalised outputs (DSN's DiffLoss)."""
    a = F.normalize(a.reshape(a.shape[0], -1).float(), dim=1)
    b = F.normalize(b.reshape(b.shape[0], -1).float(), dim=1)
    return (a.t() @ b).pow(2).mean()


def balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """``E^2 * mean(mean_softmax * top1_fraction)`` over the tokens of ``logits [..., E]``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    e = flat.shape[-1]
    probs = torch.softmax(flat, -1).mean(0)
    top1 = F.one_hot(flat.argmax(-1), e).float().mean(0)
    return e * e * (probs * top1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class Pilot(Method):
    name = NAME
    default_options = {
        "rank": 8,                 # bottleneck of every branch
        "orth": 0.1,               # stage 1: DiffLoss coefficient (released code: 0.1)
        "balance": 0.1,            # stage 2: load-balancing coefficient (0.1)
        "z": 0.01,                 # stage 2: router z-loss coefficient (0.01)
        "moa_from_round": None,    # first round (1-based) of stage 2 (null: rounds // 2 + 1)
    }
    conflicts = {"pathweave": "both put adapters beside the shared connector's layers",
                 "expansion": "both add adapters to the shared connector"}

    def __init__(self, **options):
        super().__init__(**options)
        if int(self.options["rank"]) < 1:
            raise ValueError(f"method {NAME!r}: rank must be >= 1")
        for key in ("orth", "balance", "z"):
            if float(self.options[key]) < 0:
                raise ValueError(f"method {NAME!r}: {key} must be >= 0")
        self.state = PilotState()
        self.tasks: list[str] = []
        self.layers: dict[str, PilotLayer] = {}

    def setup(self, ctx) -> None:
        from mil_plugins.client_split import split_clients, task_keys

        section = ctx.recipe.get("federated")
        self.tasks = (task_keys(split_clients(section, ctx.stages, ctx.seed)) if section
                      else [st.name for st in ctx.stages])
        if ctx.model.connector.shared is None:
            raise ValueError(f"method {NAME!r} needs a shared connector (model.connector.mode: shared)")
        names = [n for n, _ in _linears(ctx.model)]
        last = names[-1]
        self.layers = ctx.model.wrap_linears(
            NAME, r".*", lambda name, lin: PilotLayer(lin.in_features, lin.out_features,
                                                      int(self.options["rank"]), self.tasks,
                                                      self.state, record=name == last),
            scope="connector")

    def _phase(self, fed: dict | None) -> int:
        if not fed:
            return 1
        start = self.options["moa_from_round"]
        if start is None:
            start = int(fed["rounds"]) // 2 + 1
        return 2 if int(fed["round"]) + 1 >= int(start) and len(self.tasks) > 1 else 1

    def _route(self, ctx) -> None:
        """The task whose branch runs: the federation's client task, else the current stage."""
        fed = getattr(ctx, "federation", None)
        task = fed["task"] if fed else (ctx.stage.name if ctx.stage is not None else None)
        if task is not None and task not in self.tasks:
            raise ValueError(f"method {NAME!r}: task {task!r} is not one of {self.tasks}")
        self.state.task, self.state.phase = task, self._phase(fed)

    def before_stage(self, ctx, stage) -> None:
        self._route(ctx)

    def trainable(self, ctx, stage, names):
        if self.state.task is None:
            return names
        own = {f"task.{_safe(self.state.task)}.", "client."}
        if self.state.phase == 2:
            own.add("gate.")
        return set(names) | {n for n, _ in ctx.model.named_parameters()
                             if TAG in n and n.split(TAG, 1)[1].startswith(tuple(own))}

    def before_forward(self, ctx, batch) -> None:
        self._route(ctx)  # evaluation scores each task (stage or client) with its own branch
        self.state.branches.clear()
        self.state.gate_logits.clear()

    def loss_terms(self, ctx, batch, outputs):
        terms = {}
        o = self.options
        if self.state.branches and float(o["orth"]):
            t, c = self.state.branches[-1]
            terms["orth"] = float(o["orth"]) * diff_loss(t, c)
        if self.state.gate_logits:
            n = len(self.state.gate_logits)
            if float(o["balance"]):
                terms["balance"] = float(o["balance"]) * sum(
                    balance_loss(g) for g in self.state.gate_logits) / n
            if float(o["z"]):
                terms["z"] = float(o["z"]) * sum(z_loss(g) for g in self.state.gate_logits) / n
        return terms

    def federated_role(self, name: str) -> str | None:
        """``"local"`` for the client branch (kept per client, never aggregated), else ``None``."""
        if TAG in name and name.split(TAG, 1)[1].startswith("client."):
            return "local"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("tasks") is not None and list(state["tasks"]) != self.tasks:
            raise ValueError(f"method {NAME!r}: the checkpoint's tasks {state['tasks']} differ "
                             f"from the recipe's {self.tasks}")


def _linears(model) -> list[tuple[str, nn.Linear]]:
    from mil_plugins.model.layer_modules import find_linears

    return find_linears(model.connector.shared, r".*")
