"""One client's local training: the recipe's own model, data split, methods and training loop.

:class:`ClientTrainer` builds a :class:`~mil_plugins.engine.session.Session` once per process and
trains any client of the federation on request (a Flower ClientApp, or the in-process clients of a
test): restore the model to its initial trainable state, load what the server sent, train the
client's local epochs with the stage trainer and the method hooks (plus FedProx's proximal term
when the aggregator asks for it), and return the trained tensors, the sample count and the loss.
"""

from __future__ import annotations

import torch

from mil_plugins.engine.loop import StagePlan
from mil_plugins.engine.steps import train_plan, trainable_names
from mil_plugins.federated.params import load_into, snapshot, standardizer_names
from mil_plugins.client_split import split_clients
from mil_plugins.methods.base import Method
from mil_plugins.methods.context import Stage
from mil_plugins.methods.dispatch import MethodHooks


class ProximalTerm(Method):
    """FedProx's ``mu / 2 * ||w - w_received||^2`` over the parameters a client trains."""

    name = "fedprox"
    default_options = {"mu": 0.0}

    def __init__(self, mu: float, reference: dict, params: dict):
        super().__init__(mu=float(mu))
        self.reference = {n: reference[n].to(params[n].device) for n in reference if n in params}
        self.params = params

    def loss_terms(self, ctx, batch, outputs):
        total = sum(((self.params[n] - ref.to(self.params[n].dtype)) ** 2).sum()
                    for n, ref in self.reference.items() if self.params[n].requires_grad)
        return {"proximal": 0.5 * float(self.options["mu"]) * total} if self.reference else {}


class _Quiet:
    """A logger that keeps nothing (clients report their loss in the reply)."""

    def log(self, record: dict) -> None:
        return None

    def close(self) -> None:
        return None


def client_stage(client, index: int = 0) -> Stage:
    modality = client.modalities[0] if len(client.modalities) == 1 else None
    return Stage(index, client.name, modality, train_samples=client.train_samples,
                 test_samples=client.test_samples, config={})


def federation_info(client, rnd: int, rounds: int) -> dict:
    return {"client": client.index, "task": client.task, "round": int(rnd), "rounds": int(rounds)}


class ClientTrainer:
    """Trains the clients of one recipe in this process (one Session, any client)."""

    def __init__(self, recipe: dict, session=None, logger=None):
        from mil_plugins.engine.distributed import Dist
        from mil_plugins.engine.session import Session
        from mil_plugins.federated.build import build_aggregator

        self.recipe = recipe
        self.fed = recipe["federated"]
        self.session = session or Session(recipe, Dist())
        self.clients = split_clients(self.fed, self.session.stages, recipe["train"]["seed"])
        self.mu = build_aggregator(self.fed).proximal_mu
        self.logger = logger or _Quiet()
        model = self.session.model
        names: set[str] = set()
        for c in self.clients:
            self._enter(c, 0)
            names |= trainable_names(self.session, recipe["train"]["trainable"], c.modalities,
                                     self.session.ctx.stage)
        names |= {n for n, _ in model.named_parameters() if n not in self.session.base_names}
        fitted = {n for n, _ in model.named_buffers() if ".standardizers." in n}
        self.initial = snapshot(model, names | fitted)

    def _enter(self, client, rnd: int) -> Stage:
        ctx = self.session.ctx
        stage = client_stage(client)
        ctx.federation = federation_info(client, rnd, self.fed["rounds"])
        ctx.stage, ctx.seen = stage, [stage]
        self.session.hooks.before_stage(stage)
        return stage

    def _fit_standardizers(self, client) -> None:
        for m in client.modalities:
            own = [s for s in client.train_samples if m in s.media]
            self.session.fit_standardizer(Stage(0, client.name, m, train_samples=own))

    def train(self, index: int, rnd: int, received: dict) -> tuple[dict, int, dict]:
        """Train client ``index`` in round ``rnd`` from ``received``; returns ``(tensors it
        trained and its standardisers, training samples, {"loss", "steps", "seconds"})``."""
        if not 0 <= index < len(self.clients):
            raise ValueError(f"client {index} is not one of the recipe's {len(self.clients)} "
                             f"(federated.clients)")
        client = self.clients[index]
        session, model, train = self.session, self.session.model, self.recipe["train"]
        load_into(model, self.initial)
        load_into(model, received)
        self._fit_standardizers(client)
        stage = self._enter(client, rnd)
        samples = session.hooks.train_samples(stage, list(client.train_samples))
        names = trainable_names(session, train["trainable"], client.modalities, stage)
        plan = StagePlan(f"{client.name}-round{rnd + 1}", 1000 * rnd + client.index, samples,
                         self.fed["local_epochs"], self.fed["local_steps"], train["lr"],
                         train["mm_projector_lr"])
        hooks = session.hooks
        if self.mu > 0:
            params = dict(model.named_parameters())
            prox = ProximalTerm(self.mu, {n: received[n] for n in names if n in received}, params)
            hooks = MethodHooks(list(session.hooks.methods) + [prox], session.ctx)
        torch.manual_seed(train["seed"] + 7919 * rnd + client.index)
        result = train_plan(session, plan, names, self.logger, hooks)
        session.hooks.after_stage(stage)
        out = snapshot(model, names | standardizer_names(model, client.modalities))
        return out, len(samples), {"loss": float(result["loss"]), "steps": int(result["steps"]),
                                   "seconds": float(result["seconds"])}
