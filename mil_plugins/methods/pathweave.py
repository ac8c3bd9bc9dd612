"""``pathweave``: adapter-in-adapter (AnA) with a per-modality MoE gate.

Yu et al., 2024, "LLMs Can Evolve Continually on Modality for X-Modal Reasoning" (PathWeave,
NeurIPS 2024, arXiv 2410.20178, code JiazuoYu/PathWeave). Each stage adds a *uni-modal adapter*
beside every targeted projection; earlier adapters are frozen, and each gets a small trainable
*in-adapter* inside its bottleneck that turns it into a *cross-modal adapter* for the new
modality; a per-modality gate mixes them per token. See ``docs/methods.md`` for how the parts map.

Per targeted linear layer ``W`` (``targets``: the shared connector's linear layers, and with
``llm_targets`` the LLM's attention projections) and adapter ``j``::

    A_j(x)  = s_j * U_j(D_j x)                D: d_in -> r (+bias), U: r -> d_out (+bias, zero-init),
    Â_j(x)  = s_j * U_j(F_j(D_j x))           s_j a learnable scalar (init 1); no nonlinearity
                                              F_j: r -> r, the in-adapter (replaces the identity)
    y       = W x + sum_{j<=k} g_j(x) E_j(x)  E_j = Â_j (j < k), E_k = A_k; at k = 0: W x + A_0(x)
    g(x)    = softmax(x W_g + eps * (softplus(x W_n) + 0.01)),  eps ~ N(0, 1) in training only,
              W_g, W_n zero-initialised (the gate starts uniform)

for the tokens of the modality whose own adapter is ``k``; other tokens (text, modalities not yet
trained) take ``W x`` only. Which adapter a token uses comes from the token-modality map (the
modality of the token), never from the stage or task of the sample.

Stages: with ``train_base: first_stage`` (default) the first modality stage trains the base (the
recipe's groups, e.g. the shared connector) and gets no adapter -- PathWeave starts from an image
MLLM -- and every later stage adds adapter ``k`` (its modality's path is adapters ``0..k``). With
``never`` the first stage gets adapter 0 too and the base stays as built.

In-adapters (``in_adapters``): ``retrain`` is the released code -- one ``F_j`` per old adapter, shared
by every later modality and retrained in every later stage (so an earlier modality's path drifts);
``snapshot`` gives each path its own copies ``F_{k,j}``, initialised from the previous path's trained
copies and frozen after their stage, so an earlier modality's output stays exactly as it was.

Hooks: ``setup`` (every stage's adapters, gates and in-adapters, up front), ``before_stage``
(route the stage's modality to its adapter; snapshot copies), ``trainable``, ``param_groups``
(``gate_lr_scale``), ``before_forward`` (seeded gate noise), state (routes, noise counter).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mil_plugins.methods._common import salt
from mil_plugins.methods.base import Method

NAME = "pathweave"
IN_ADAPTERS = ("snapshot", "retrain")
TRAIN_BASE = ("first_stage", "never")


class Adapter(nn.Module):
    """PathWeave's bottleneck adapter ``s * U(M(D x))`` (``M``: identity or an in-adapter)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank)
        self.up = nn.Linear(rank, d_out)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # "lora" init of the code
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(1))  # 1-d: DeepSpeed ZeRO cannot flatten 0-d parameters

    def forward(self, x: torch.Tensor, inner: nn.Module | None = None) -> torch.Tensor:
        h = self.down(x)
        if inner is not None:
            h = inner(h)
        return self.scale * self.up(h)


class Noise:
    """The gates' noise source: on or off, and a seeded generator set per training forward."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.generator: torch.Generator | None = None


class Gate(nn.Module):
    """Dense softmax gate over ``n`` experts, per token; zero-initialised (uniform at start)."""

    def __init__(self, d_in: int, n: int, noise: Noise):
        super().__init__()
        self.w_gate = nn.Linear(d_in, n, bias=False)
        self.w_noise = nn.Linear(d_in, n, bias=False)
        nn.init.zeros_(self.w_gate.weight)
        nn.init.zeros_(self.w_noise.weight)
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.w_gate(x)
        if self.training and self.noise.enabled:
            std = F.softplus(self.w_noise(x)) + 0.01
            eps = torch.randn(logits.shape, generator=self.noise.generator, dtype=torch.float32)
            logits = logits + eps.to(device=logits.device, dtype=logits.dtype) * std
        return torch.softmax(logits.float(), dim=-1).to(x.dtype)


def akey(k: int) -> str:
    return f"a{k}"


def fkey(k: int, j: int, mode: str) -> str:
    """In-adapter of old adapter ``j`` on the path of adapter ``k``."""
    return akey(j) if mode == "retrain" else f"{akey(k)}-{akey(j)}"


class PathWeaveLayer(nn.Module):
    """The method module beside one linear layer: adapters, in-adapters and gates."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_adapters: int, mode: str,
                 routes: dict[str, int], noise: Noise):
        super().__init__()
        self.mode, self.routes = mode, routes
        self.adapters = nn.ModuleDict({akey(k): Adapter(d_in, d_out, rank) for k in range(n_adapters)})
        self.in_adapters = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for k in range(1, n_adapters):
            self.gates[akey(k)] = Gate(d_in, k + 1, noise)
            for j in range(k):
                key = fkey(k, j, mode)
                if key not in self.in_adapters:
                    self.in_adapters[key] = nn.Linear(rank, rank)  # PyTorch default init, as the code

    def path(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """``sum_j g_j E_j(x)`` of the path ending at adapter ``k`` (``A_0(x)`` for ``k = 0``)."""
        own = self.adapters[akey(k)](x)
        if k == 0:
            return own
        experts = [self.adapters[akey(j)](x, self.in_adapters[fkey(k, j, self.mode)])
                   for j in range(k)] + [own]
        gate = self.gates[akey(k)](x)
        return (torch.stack(experts, -1) * gate.unsqueeze(-2)).sum(-1)

    def gate_weights(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return self.gates[akey(k)](x)

    def forward(self, x: torch.Tensor, y: torch.Tensor, route) -> torch.Tensor:
        for modality, k in self.routes.items():
            mask = route.mask(modality)
            if bool(mask.any()):
                y = torch.where(mask.unsqueeze(-1), y + self.path(k, x).to(y.dtype), y)
        return y


class PathWeave(Method):
    name = NAME
    default_options = {
        "rank": 8,                     # bottleneck r (PathWeave: lora_bottleneck = 8)
        "targets": ["connector"],      # where adapters go: connector and/or llm
        "llm_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],  # with "llm" in targets
        "in_adapters": "snapshot",     # snapshot | retrain (the released code)
        "train_base": "first_stage",   # first_stage | never
        "gate_noise": True,            # noisy gate logits while training
        "gate_lr_scale": None,         # gates' lr = lr * gate_lr_scale (None: lr)
    }
    conflicts = {
        "expansion": "both add per-stage adapters to the shared connector; use one of them",
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["in_adapters"] not in IN_ADAPTERS:
            raise ValueError(f"method {NAME!r}: in_adapters must be one of {IN_ADAPTERS}, "
                             f"got {o['in_adapters']!r}")
        if o["train_base"] not in TRAIN_BASE:
            raise ValueError(f"method {NAME!r}: train_base must be one of {TRAIN_BASE}, "
                             f"got {o['train_base']!r}")
        bad = set(o["targets"]) - {"connector", "llm"}
        if bad or not o["targets"]:
            raise ValueError(f"method {NAME!r}: targets must be a non-empty subset of "
                             f"['connector', 'llm'], got {o['targets']!r}")
        if int(o["rank"]) < 1:
            raise ValueError(f"method {NAME!r}: rank must be >= 1")
        self.stage_adapter: dict[int, int] = {}   # stage index -> its adapter k
        self.routes: dict[str, int] = {}          # modality -> adapter k of its path (shared)
        self.layers: dict[str, PathWeaveLayer] = {}
        self.noise = Noise(bool(self.options["gate_noise"]))
        self.forwards = 0                         # training forwards in stage noise_stage
        self.noise_stage: int | None = None
        self.initialised: list[int] = []          # stages whose snapshot copies were made

    # ---- structure -----------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        o = self.options
        self.stage_adapter = {}
        k = 0
        first = True
        for st in ctx.stages:
            if st.modality is None:
                continue
            if first and o["train_base"] == "first_stage":
                first = False
                continue
            first = False
            self.stage_adapter[st.index] = k
            k += 1
        if not k:
            raise ValueError(f"method {NAME!r}: no stage gets an adapter (one modality stage and "
                             f"train_base: first_stage)")

        def make(name: str, linear: nn.Linear) -> PathWeaveLayer:
            return PathWeaveLayer(linear.in_features, linear.out_features, int(o["rank"]), k,
                                  o["in_adapters"], self.routes, self.noise)

        self.layers = {}
        if "connector" in o["targets"]:
            found = ctx.model.wrap_linears(NAME, r".*", make, scope="connector")
            self.layers.update({f"connector.{n}": m for n, m in found.items()})
        if "llm" in o["targets"]:
            found = ctx.model.wrap_linears(NAME, list(o["llm_targets"]), make, scope="llm")
            self.layers.update({f"llm.{n}": m for n, m in found.items()})

    def before_stage(self, ctx, stage) -> None:
        k = self.stage_adapter.get(stage.index)
        if self.noise_stage != stage.index:  # (a mid-stage resume keeps its restored count)
            self.noise_stage, self.forwards = stage.index, 0
        if k is None:
            return
        self.routes[stage.modality] = k
        if self.options["in_adapters"] != "snapshot" or stage.index in self.initialised or k < 2:
            self.initialised = sorted(set(self.initialised) | {stage.index})
            return
        # the new path's in-adapters start from the previous path's trained ones (what the
        # released code's retraining would start from)
        with torch.no_grad():
            for layer in self.layers.values():
                for j in range(k - 1):
                    layer.in_adapters[fkey(k, j, "snapshot")].load_state_dict(
                        layer.in_adapters[fkey(k - 1, j, "snapshot")].state_dict())
        self.initialised = sorted(set(self.initialised) | {stage.index})

    def _own(self, name: str, stage) -> bool:
        k = self.stage_adapter.get(stage.index)
        tag = f".modules_by_owner.{NAME}."
        if k is None or tag not in name:
            return False
        rest = name.split(tag, 1)[1]
        if rest.startswith((f"adapters.{akey(k)}.", f"gates.{akey(k)}.")):
            return True
        if rest.startswith("in_adapters."):
            key = rest.split(".")[1]
            mode = self.options["in_adapters"]
            return key in {fkey(k, j, mode) for j in range(k)}
        return False

    def trainable(self, ctx, stage, names):
        if stage.modality is None:
            return names
        names = set(names)
        if self.options["train_base"] == "never" or stage.index in self.stage_adapter:
            names -= {n for n in names if n.startswith(("llm.", "connector.shared."))}
        return names | {n for n, _ in ctx.model.named_parameters() if self._own(n, stage)}

    def param_groups(self, ctx, stage):
        scale = self.options["gate_lr_scale"]
        if scale is None or stage is None or stage.index not in self.stage_adapter:
            return []
        names = [n for n, _ in ctx.model.named_parameters()
                 if self._own(n, stage) and ".gates." in n]
        return [{"names": names, "lr_scale": float(scale), "weight_decay": 0.0}]

    def before_forward(self, ctx, batch) -> None:
        if ctx.model.training and self.noise.enabled:
            self.forwards += 1
            self.noise.generator = ctx.generator(salt(NAME, "noise", self.forwards))
        else:
            self.noise.generator = None

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"routes": dict(self.routes), "forwards": self.forwards,
                "noise_stage": self.noise_stage,
                "initialised": list(self.initialised),
                "stage_adapter": {str(i): k for i, k in self.stage_adapter.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved = {int(i): int(k) for i, k in (state.get("stage_adapter") or {}).items()}
        if saved != self.stage_adapter:
            raise ValueError(f"method {NAME!r}: the checkpoint's adapters per stage {saved} differ "
                             f"from the recipe's {self.stage_adapter}")
        self.routes.clear()  # in place: every layer holds this dict
        self.routes.update({m: int(k) for m, k in state["routes"].items()})
        self.forwards = int(state.get("forwards", 0))
        self.noise_stage = state.get("noise_stage")
        self.initialised = [int(i) for i in state.get("initialised", [])]
