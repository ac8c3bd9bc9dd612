"""The federated runner on Flower: a ServerApp and a ClientApp over the same recipe and code.

This is the only module that imports ``flwr``. Only tensors cross the wire: the server's view of a
client and the client's trained parameters travel as Flower ``ArrayRecord``s (numpy arrays keyed
by parameter name), the round and the resolved recipe as a ``ConfigRecord`` (JSON text), the
client's sample count and loss as a ``MetricRecord``; never pickles.

One machine: :func:`run_simulation_engine` (``mil federate RECIPE``) runs Flower's Simulation
Engine with ``federated.clients`` virtual SuperNodes (Ray), each ClientApp told its client by
``node_config["partition-id"]``. Many machines: :func:`write_flower_app` (``mil federate RECIPE
--flower-app DIR``) writes a Flower App whose components are :data:`server_app` and
:data:`client_app`; ``flwr run DIR <connection>`` submits it to a SuperLink, and every SuperNode
started with ``--node-config "partition-id=I num-partitions=N"`` trains client ``I``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

# before flwr / ray read them: no usage telemetry from our processes (set them to 1 to opt in)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message,  # noqa: E402
                      MetricRecord, RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

#: seconds the server waits for every client's SuperNode to connect
NODE_WAIT_S = 600.0


# ---- tensors <-> Flower records --------------------------------------------------------------------
def to_record(tensors: dict) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(t.detach().cpu().numpy()))
                        for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict:
    return {name: torch.from_numpy(np.array(arr.numpy(), copy=True)) for name, arr in record.items()}


# ---- client side ------------------------------------------------------------------------------------
_TRAINERS: dict[str, object] = {}  # one ClientTrainer per recipe in this process


def _trainer(recipe_json: str):
    key = hashlib.sha256(recipe_json.encode()).hexdigest()
    if key not in _TRAINERS:
        from mil_plugins.federated.client import ClientTrainer

        recipe = json.loads(recipe_json)
        threads = recipe["train"].get("num_threads")
        if threads:
            torch.set_num_threads(int(threads))
        _TRAINERS.clear()
        _TRAINERS[key] = ClientTrainer(recipe)
    return _TRAINERS[key]


def _partition(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config "
                         "\"partition-id=I num-partitions=N\" (I: its client's index)")
    return int(context.node_config["partition-id"])


client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Which client this SuperNode trains."""
    return Message(RecordDict({"metrics": MetricRecord({"client": _partition(context)})}),
                   reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    index = _partition(context)
    trainer = _trainer(str(config["recipe"]))
    tensors, n, metrics = trainer.train(index, int(config["round"]),
                                        from_record(msg.content["arrays"]))
    return Message(RecordDict({"arrays": to_record(tensors),
                               "metrics": MetricRecord({"client": index, "num-examples": int(n),
                                                        **{k: float(v) for k, v in metrics.items()}})}),
                   reply_to=msg)


# ---- server side ------------------------------------------------------------------------------------
class GridClients:
    """The federated server's ``clients`` callable over a Flower grid."""

    def __init__(self, grid: Grid, recipe: dict, wait_s: float = NODE_WAIT_S):
        self.grid, self.recipe_json = grid, json.dumps(recipe)
        n = int(recipe["federated"]["clients"])
        deadline = time.monotonic() + wait_s
        while len(nodes := list(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {n} SuperNodes connected after {wait_s:.0f} s")
            time.sleep(0.2)
        replies = grid.send_and_receive([
            Message(RecordDict({"config": ConfigRecord({"ask": "client"})}), dst_node_id=node,
                    message_type="query") for node in nodes])
        self.node_of: dict[int, int] = {}
        for reply in replies:
            self._check(reply, "query")
            self.node_of[int(reply.content["metrics"]["client"])] = reply.metadata.src_node_id
        missing = sorted(set(range(n)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no SuperNode trains client(s) {missing}: start one per client with "
                               f"--node-config \"partition-id=I num-partitions={n}\"")

    @staticmethod
    def _check(reply: Message, what: str) -> None:
        if reply.has_error():
            raise RuntimeError(f"a client failed its {what} message: {reply.error.reason}")

    def __call__(self, rnd: int, chosen: list, payloads: dict) -> dict:
        messages = [Message(RecordDict({"arrays": to_record(payloads[c]),
                                        "config": ConfigRecord({"round": int(rnd),
                                                                "recipe": self.recipe_json})}),
                            dst_node_id=self.node_of[c], message_type="train") for c in chosen]
        out = {}
        for reply in self.grid.send_and_receive(messages):
            self._check(reply, f"round {rnd + 1} train")
            m = reply.content["metrics"]
            metrics = {k: m[k] for k in ("loss", "steps", "seconds") if k in m}
            out[int(m["client"])] = (from_record(reply.content["arrays"]), int(m["num-examples"]),
                                     metrics)
        return out


def serve(grid: Grid, server) -> dict:
    """Run a :class:`~mil_plugins.federated.server.FederatedServer`'s rounds over ``grid``."""
    return server.run(GridClients(grid, server.recipe))


server_app = ServerApp()


@server_app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    """Deployment Engine: the recipe (and overrides) come from the app's run config."""
    from mil_plugins.federated.server import FederatedServer
    from mil_plugins.recipe import load_recipe

    cfg = context.run_config
    recipe = load_recipe(str(cfg["recipe"]), json.loads(str(cfg.get("overrides", "[]"))))
    server = FederatedServer(recipe, resume=bool(cfg.get("resume", False)),
                             overwrite=bool(cfg.get("overwrite", False)))
    try:
        metrics = serve(grid, server)
    finally:
        server.folder.release()
    print(f"[mil] done: {server.out / 'report.md'}; mean personalised score "
          f"{metrics.get('final_average_accuracy')}")


def run_simulation_engine(server) -> dict:
    """Flower's Simulation Engine: ``federated.clients`` virtual SuperNodes on this machine."""
    from flwr.simulation import run_simulation

    fed = server.recipe["federated"]
    done: dict = {}

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            done["metrics"] = serve(grid, server)
        except BaseException as exc:  # re-raised below: Flower only logs a ServerApp's errors
            done["error"] = exc

    cpus = float(fed["client_cpus"])
    run_simulation(app, client_app, num_supernodes=int(fed["clients"]),
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False,
                                                 "logging_level": "error"}})
    if "error" in done:
        raise done["error"]
    if "metrics" not in done:
        raise RuntimeError("the Flower simulation ended without finishing the rounds "
                           "(see Flower's log above)")
    return done["metrics"]


def write_flower_app(directory, recipe: str, overrides: list[str]) -> Path:
    """A Flower App (``pyproject.toml``) running ``recipe`` with ``overrides`` on the Deployment
    Engine; data and output paths are made absolute (the SuperLink runs the ServerApp elsewhere)."""
    from mil_plugins.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    fixed = [*overrides, f"data.root={Path(loaded['data']['root']).resolve()}",
             f"output.dir={Path(loaded['output']['dir']).resolve()}"]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text = f'''# A Flower App for `mil federate` (written by `mil federate RECIPE --flower-app DIR`).
# Every machine needs the same mil-plugins install; the SuperLink's machine also reads the recipe.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "mil-federate"
version = "1.0.0"
dependencies = ["flwr[simulation]>=1.42"]

[tool.flwr.app]
publisher = "mil-plugins"

[tool.flwr.app.components]
serverapp = "mil_plugins.integrations.flower.app:server_app"
clientapp = "mil_plugins.integrations.flower.app:client_app"

[tool.flwr.app.config]
recipe = {json.dumps(str(Path(recipe).resolve()))}
overrides = {json.dumps(json.dumps(fixed))}
resume = false
overwrite = true
'''
    from mil_plugins.atomic import atomic_write_text

    atomic_write_text(out / "pyproject.toml", text)
    return out
