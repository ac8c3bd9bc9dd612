"""Federated instruction tuning (``mil federate``): aggregators, client split, Pilot's parts, and
whole runs -- in this process, on Flower's Simulation Engine (3 virtual clients, 2 rounds, the
same numbers), killed and resumed, and on the Deployment Engine over loopback (SuperLink and two
SuperNodes as separate processes)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mil_plugins.federated.aggregators import (FedAvg, FedProx, LocalOnly, PilotAggregation,
                                               distance_weights, weighted_mean)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "federated" / "small_fedavg.yaml"


# ---- aggregators ----------------------------------------------------------------------------------
def test_fedavg_is_exactly_the_sample_weighted_mean():
    states = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)},
              {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(0.0)},
              {"w": torch.tensor([-1.0, 0.0]), "b": torch.tensor(8.0)}]
    glob, personal = FedAvg().aggregate(states, [1, 2, 1], text=set())
    assert torch.equal(glob["w"], torch.tensor([1.5, 3.5]))   # (1 + 6 - 1) / 4, (2 + 12 + 0) / 4
    assert torch.equal(glob["b"], torch.tensor(3.0))          # (4 + 0 + 8) / 4
    assert personal == [None, None, None]
    assert glob["w"].dtype == torch.float32


def test_mean_is_over_the_clients_that_hold_a_parameter():
    out = weighted_mean([{"a": torch.tensor([2.0]), "only0": torch.tensor([5.0])},
                         {"a": torch.tensor([4.0])}], [3.0, 1.0])
    assert torch.equal(out["a"], torch.tensor([2.5])) and torch.equal(out["only0"], torch.tensor([5.0]))
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], [1, 1])


def test_fedprox_averages_like_fedavg_and_asks_clients_for_the_proximal_term():
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}]
    assert FedProx(mu=0.5).proximal_mu == 0.5 and FedAvg().proximal_mu == 0.0
    assert torch.equal(FedProx().aggregate(states, [1, 1], set())[0]["w"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-1)


def test_fedprox_proximal_term_is_half_mu_times_the_squared_distance():
    from mil_plugins.federated.client import ProximalTerm

    w = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    frozen = torch.nn.Parameter(torch.tensor([9.0]), requires_grad=False)
    prox = ProximalTerm(0.5, {"w": torch.tensor([0.0, 1.0]), "frozen": torch.tensor([0.0])},
                        {"w": w, "frozen": frozen})
    term = prox.loss_terms(None, {}, None)["proximal"]
    assert term.item() == pytest.approx(0.25 * (1.0 + 4.0))   # only what the client trains
    term.backward()
    assert torch.allclose(w.grad, 0.5 * torch.tensor([1.0, 2.0]))


def test_local_only_keeps_every_client_on_its_own_parameters():
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}]
    _, personal = LocalOnly().aggregate(states, [1, 1], set())
    assert [p["w"].item() for p in personal] == [0.0, 2.0]


def test_pilot_weights_from_hand_made_parameters():
    # text parameters of three clients: 0 and 2 coincide, 1 is at distance 5 from both
    states = [{"llm.lora": torch.tensor([0.0, 0.0]), "connector.w": torch.tensor([1.0])},
              {"llm.lora": torch.tensor([3.0, 4.0]), "connector.w": torch.tensor([3.0])},
              {"llm.lora": torch.tensor([0.0, 0.0]), "connector.w": torch.tensor([5.0])}]
    agg = PilotAggregation(temperature=5.0)
    glob, personal = agg.aggregate(states, [1, 1, 2], text={"llm.lora"})
    # a_ij = n_j exp(-d_ij / tau) / sum_k n_k exp(-d_ik / tau), d_01 = d_21 = 5, d_02 = 0
    e = math.exp(-1.0)
    row0 = torch.tensor([1.0, e, 2.0], dtype=torch.float64) / (3.0 + e)
    row1 = torch.tensor([e, 1.0, 2 * e], dtype=torch.float64) / (1.0 + 3 * e)
    assert torch.allclose(agg.last_weights[0], row0) and torch.allclose(agg.last_weights[2], row0)
    assert torch.allclose(agg.last_weights[1], row1)
    assert torch.allclose(agg.last_weights.sum(1), torch.ones(3, dtype=torch.float64))
    # the weights are used: client i's next text parameters are sum_j a_ij theta_j
    expected0 = (row0[1] * torch.tensor([3.0, 4.0], dtype=torch.float64)).float()
    assert torch.allclose(personal[0]["llm.lora"], expected0)
    assert torch.allclose(personal[1]["llm.lora"],
                          (row1[1] * torch.tensor([3.0, 4.0], dtype=torch.float64)).float())
    assert set(personal[0]) == {"llm.lora"}                   # only the text side is personalised
    assert torch.equal(glob["connector.w"], torch.tensor([3.5]))   # (1 + 3 + 10) / 4: FedAvg
    assert torch.equal(glob["llm.lora"], torch.tensor([0.75, 1.0]))


def test_pilot_temperature_defaults_to_the_median_distance():
    v = torch.tensor([[0.0], [1.0], [3.0]])
    alpha, tau = distance_weights(v, [1, 1, 1])
    assert tau == 2.0  # off-diagonal distances 1, 3, 1, 2, 3, 2 -> median 2
    assert all(int(alpha[i].argmax()) == i for i in range(3))  # each client weighs itself most


def test_aggregators_are_a_registry_kind_a_third_party_can_extend(tmp_path):
    from mil_plugins.federated.aggregators import Aggregator
    from mil_plugins.plugins import AGGREGATORS
    from mil_plugins.recipe import RecipeError, load_recipe

    assert {"fedavg", "fedprox", "pilot", "local"} <= set(AGGREGATORS.names())

    class FirstClient(Aggregator):
        name = "first_client"

        def aggregate(self, states, num_samples, text):
            return dict(states[0]), [None] * len(states)

    AGGREGATORS.register("first_client", FirstClient)
    try:
        recipe = load_recipe(RECIPE, ["federated.aggregator=first_client", "data.root=x",
                                      f"output.dir={tmp_path}"])
        assert recipe["federated"]["aggregator"] == "first_client"
        with pytest.raises(RecipeError, match="unknown aggregator 'fedavgg'.*fedavg"):
            load_recipe(RECIPE, ["federated.aggregator=fedavgg"])
        with pytest.raises(RecipeError, match="federated.aggregator_options.*mu"):
            load_recipe(RECIPE, ["federated.aggregator_options={mu: 1}"])
        with pytest.raises(RecipeError, match="clients_per_round"):
            load_recipe(RECIPE, ["federated.clients_per_round=4"])
    finally:
        AGGREGATORS.unregister("first_client")


# ---- client split ---------------------------------------------------------------------------------
def _stage(name, modality, tasks, n=4):
    def sample(i, t, split):
        return SimpleNamespace(id=f"{name}-{split}-{i}", task=t, media={modality: []},
                               conversations=[{"from": "gpt", "value": f"a{i % 2}"}])
    return SimpleNamespace(name=name, modality=modality,
                           train_samples=[sample(i, tasks[i % len(tasks)], "train") for i in range(n)],
                           test_samples=[sample(i, tasks[i % len(tasks)], "test") for i in range(n)])


def _section(**kw):
    return {"clients": 3, "split": "task", "dirichlet_alpha": 0.5, "dirichlet_label": "task", **kw}


def test_split_by_task_gives_each_client_its_own_task():
    from mil_plugins.client_split import split_clients, task_keys

    stages = [_stage("image", "image", ["shape", "color", "caption"], n=6)]
    clients = split_clients(_section(), stages, seed=0)
    assert [c.task for c in clients] == ["image/shape", "image/color", "image/caption"]
    assert all({s.task for s in c.train_samples} == {c.task.split("/")[1]} for c in clients)
    assert all({s.task for s in c.test_samples} == {c.task.split("/")[1]} for c in clients)
    assert task_keys(clients) == [c.task for c in clients]
    with pytest.raises(ValueError, match="3 group"):
        split_clients(_section(clients=4), stages, seed=0)


def test_split_by_modality_pooled_and_dirichlet():
    from mil_plugins.client_split import split_clients

    stages = [_stage("image", "image", ["shape"]), _stage("audio", "audio", ["pitch"])]
    by_mod = split_clients(_section(clients=2, split="modality"), stages, seed=0)
    assert [c.modalities for c in by_mod] == [["image"], ["audio"]]
    pooled = split_clients(_section(clients=1, split="pooled"), stages, seed=0)
    assert len(pooled[0].train_samples) == 8 and pooled[0].modalities == ["image", "audio"]
    big = [_stage("image", "image", ["shape", "color"], n=40)]
    a = split_clients(_section(clients=2, split="dirichlet", dirichlet_alpha=1.0), big, seed=3)
    b = split_clients(_section(clients=2, split="dirichlet", dirichlet_alpha=1.0), big, seed=3)
    assert [[s.id for s in c.train_samples] for c in a] == [[s.id for s in c.train_samples] for c in b]
    assert sorted(s.id for c in a for s in c.train_samples) == sorted(s.id for s in big[0].train_samples)


# ---- Pilot's losses ---------------------------------------------------------------------------------
def test_pilot_losses():
    from mil_plugins.methods.pilot import balance_loss, diff_loss, z_loss

    # DiffLoss = mean((A^T B)^2) over the batch: zero when no feature of one branch co-varies
    # with a feature of the other across the samples
    a = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])       # unit rows [1, 0], [-1, 0]
    b = torch.tensor([[0.0, 3.0], [0.0, 1.0]])        # unit rows [0, 1], [0, 1]
    assert diff_loss(a, b).item() == 0.0
    assert diff_loss(a, a).item() == pytest.approx(1.0)   # A^T A = [[2, 0], [0, 0]] -> 4 / 4
    assert diff_loss(b, b).item() == pytest.approx(1.0)
    uniform = torch.zeros(5, 3)
    assert balance_loss(uniform).item() == pytest.approx(1.0)  # E^2 * mean(1/E * [1, 0, 0])
    assert z_loss(uniform).item() == pytest.approx(math.log(3) ** 2)


# ---- whole runs -------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, MIL_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
               FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")  # nothing leaves the box
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def _args(data_root: Path, out: Path, *extra: str) -> list[str]:
    """3 clients (image shape / colour / caption), 2 rounds of 2 local steps, Pilot's connector
    and aggregation, CT-MoA in round 2; the tiny benchmark."""
    return [str(RECIPE), f"data.root={data_root}", "data.generate.size=tiny", f"output.dir={out}",
            "output.tensorboard=false", "data.preflight=manifests", "warmup.max_steps=2",
            "encoder_pretraining=null", "federated.rounds=2", "federated.local_steps=2",
            "data.max_test_samples=6",
            "eval.batch_size=8", "federated.aggregator=pilot",
            'methods=[{name: pilot, options: {rank: 4, moa_from_round: 2}}]', *extra]


def _federate(args: list[str], *flags: str) -> dict:
    from mil_plugins.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["federate", *args, *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    out = Path(next(a for a in args if a.startswith("output.dir=")).split("=", 1)[1])
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def data_root():
    from _shared import benchmark

    return benchmark("tiny", seed=0)  # shared, read-only


@pytest.fixture(scope="module")
def inprocess_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "inprocess"
    return out, _federate(_args(data_root, out), "--engine", "inprocess")


def _numbers(metrics: dict) -> list:
    return [(h["clients"], h["loss"], h["personalised"], h["global"], h["per_task"],
             (h.get("aggregation_weights") or {}).get("matrix")) for h in metrics["history"]]


@pytest.mark.slow
def test_three_clients_two_rounds_with_pilot(inprocess_run):
    out, m = inprocess_run
    assert [c["task"] for c in m["clients"]] == ["image/shape", "image/color", "image/caption"]
    assert m["completed_rounds"] == 2 and len(m["history"]) == 2
    for h in m["history"]:
        assert len(h["personalised"]) == len(h["global"]) == 3
        assert all(0.0 <= s <= 100.0 for s in h["personalised"] + h["global"])
        assert set(h["per_task"]) == {"shape", "color", "caption"}
        w = torch.tensor(h["aggregation_weights"]["matrix"])
        assert torch.allclose(w.sum(1), torch.ones(3, dtype=w.dtype))
        assert all(int(w[i].argmax()) == i for i in range(3))
    for name in ("report.md", "rounds.png", "metrics.json"):
        assert (out / name).is_file()
    assert "Pilot aggregation weights" in (out / "report.md").read_text()
    ckpts = out / "checkpoints"
    assert (ckpts / "round-0001" / "checksums.json").is_file() and (ckpts / "last").is_dir()
    from safetensors.torch import load_file

    clients = load_file(str(ckpts / "round-0002" / "clients.safetensors"))
    glob = load_file(str(ckpts / "round-0002" / "global.safetensors"))
    lora = sorted(k.split("/", 2)[2] for k in clients if k.startswith("personal/0/"))
    assert lora and all(k.startswith("llm.") for k in lora)           # text side personalised
    assert not torch.equal(clients[f"personal/0/{lora[0]}"], clients[f"personal/1/{lora[0]}"])
    assert not torch.equal(clients[f"personal/0/{lora[0]}"], glob[lora[0]])
    local = [k for k in clients if k.startswith("local/0/")]
    assert local and all(".pilot.client." in k for k in local)       # client branch stays local
    assert not any(".pilot.client." in k for k in glob)
    logs = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    terms = set().union(*(r.keys() for r in logs))
    assert {"pilot/orth", "pilot/balance", "pilot/z"} <= terms   # stage 1 in round 1, CT-MoA in 2


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_round(inprocess_run, data_root, tmp_path, monkeypatch):
    from mil_plugins.federated import server as server_mod

    _, full = inprocess_run
    out = tmp_path / "killed"
    save = server_mod.FederatedServer.save

    def save_then_die(self, path):
        save(self, path)
        raise _Killed

    monkeypatch.setattr(server_mod.FederatedServer, "save", save_then_die)
    with pytest.raises(_Killed):
        _federate(_args(data_root, out), "--engine", "inprocess")
    monkeypatch.setattr(server_mod.FederatedServer, "save", save)
    assert json.loads((out / "checkpoints" / "round-0001" / "state.json").read_text())["round"] == 1
    assert not (out / "checkpoints" / "last").exists()   # killed before `last` was updated
    resumed = _federate(_args(data_root, out), "--engine", "inprocess", "--resume")
    assert _numbers(resumed) == _numbers(full)
    monkeypatch.setenv("MIL_DEBUG", "1")  # the error itself, not mil's one-line print
    with pytest.raises(ValueError, match="federated.rounds"):
        _federate(_args(data_root, out, "federated.rounds=3"), "--engine", "inprocess", "--resume")


@pytest.mark.slow
def test_flower_simulation_engine_gives_the_same_rounds(inprocess_run, data_root, tmp_path):
    """``mil federate`` on Flower's Simulation Engine (Ray, 3 virtual SuperNodes): every tensor
    crosses Flower's ArrayRecords, and the rounds end exactly as in one process."""
    out = tmp_path / "simulation"
    proc = subprocess.run([sys.executable, "-m", "mil_plugins.cli", "federate",
                           *_args(data_root, out)], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _numbers(json.loads((out / "metrics.json").read_text())) == _numbers(inprocess_run[1])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, procs: list, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return  # one died: the test's assertion shows its log
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


@pytest.mark.slow
def test_deployment_engine_over_loopback(data_root, tmp_path):
    """SuperLink and two SuperNodes as separate processes on 127.0.0.1, the app submitted with
    ``flwr run``: one FedProx round of two clients finishes, then everything is stopped."""
    bin_dir = Path(sys.executable).parent
    link, node0, node1 = _free_ports(3)  # the SuperLink serves Fleet, Control and its runtime
    # API on one HTTP port (Flower 1.42); each SuperNode has its runtime API on its own
    env = _env()
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])  # flower-superexec & co.
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    Path(env["FLWR_HOME"]).mkdir()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    out = tmp_path / "deployment"
    app = tmp_path / "app"
    args = _args(data_root, out, "federated.clients=2", "federated.rounds=1",
                 "federated.aggregator=fedprox", "methods=[{name: finetune}]")  # FedProx here
    subprocess.run([sys.executable, "-m", "mil_plugins.cli", "federate", *args,
                    "--flower-app", str(app)], env=env, cwd=ROOT, check=True, timeout=120,
                   capture_output=True)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1", "run")}
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=logs[name],
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        start("superlink", [str(bin_dir / "flower-superlink"), "--insecure",
                            "--host", "127.0.0.1", "--port", str(link)])
        for i, port in enumerate((node0, node1)):
            start(f"node{i}", [str(bin_dir / "flower-supernode"), "--insecure",
                               "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                               "--port", str(port),
                               "--node-config", f"partition-id={i} num-partitions=2"])
        _wait_port(link, procs)
        run = start("run", [str(bin_dir / "flwr"), "run", str(app), "loopback", "--stream"])
        deadline = time.monotonic() + 300
        metrics = out / "metrics.json"
        while time.monotonic() < deadline:
            if metrics.exists() and json.loads(metrics.read_text()).get("completed_rounds") == 1:
                break
            if any(p.poll() not in (None, 0) for p in procs) or (run.poll() == 0 and not metrics.exists()):
                break
            time.sleep(1)
        for f in logs.values():
            f.flush()
        tail = "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-2000:] for n in logs)
        assert metrics.exists(), tail
        m = json.loads(metrics.read_text())
        assert m["completed_rounds"] == 1, tail
        assert len(m["history"][0]["personalised"]) == 2 and sorted(m["history"][0]["clients"]) == [0, 1]
    finally:
        for p in reversed(procs):
            _stop(p)
        for f in logs.values():
            f.close()


def test_only_the_flower_integration_imports_flwr():
    code = ("import sys; import mil_plugins.federated.server, mil_plugins.cli.federate, "
            "mil_plugins.methods.pilot, mil_plugins.federated.aggregators; "
            "print('flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
    files = [p for p in (ROOT / "mil_plugins").rglob("*.py")
             if "import flwr" in p.read_text() or "from flwr" in p.read_text()]
    assert {p.relative_to(ROOT).as_posix() for p in files} <= {
        "mil_plugins/integrations/flower/app.py"}


def test_clients_per_round_is_a_seeded_sample():
    from mil_plugins.federated.server import FederatedServer

    fake = SimpleNamespace(fed={"clients_per_round": 2}, clients=[0, 1, 2, 3],
                           recipe={"train": {"seed": 0}})
    picks = [FederatedServer.chosen(fake, r) for r in range(6)]
    assert all(len(p) == 2 and p == sorted(set(p)) for p in picks)
    assert picks == [FederatedServer.chosen(fake, r) for r in range(6)]
    assert len({tuple(p) for p in picks}) > 1
    fake.fed["clients_per_round"] = None
    assert FederatedServer.chosen(fake, 0) == [0, 1, 2, 3]


def test_compare_tabulates_federated_runs(tmp_path):
    from mil_plugins import compare
    from mil_plugins.federated.report import summarize

    groups = {}
    for label, base in (("fedavg", 50.0), ("pilot", 60.0)):
        for seed in range(3):
            d = tmp_path / label / f"seed-{seed}"
            d.mkdir(parents=True)
            hist = [{"round": 1, "clients": [0, 1], "loss": {}, "train_samples": {},
                     "personalised": [base + seed, base + 2 + seed], "global": [base, base],
                     "per_task": {"shape": base + seed, "color": base + 2 + seed}, "seconds": 1.0}]
            state = {"round": 1, "clients": [{"name": "client-0"}, {"name": "client-1"}],
                     "history": hist}
            recipe = {"federated": {"aggregator": label, "split": "task", "rounds": 1},
                      "methods": [{"name": "finetune"}], "train": {"seed": seed}}
            (d / "metrics.json").write_text(json.dumps(summarize(recipe, state)))
            groups.setdefault(label, []).append(d)
    result = compare.aggregate(groups, reference="fedavg")
    assert result["kind"] == "federated"
    pilot = result["groups"]["pilot"]
    assert pilot["metrics"]["final_average_accuracy"]["mean"] == pytest.approx(62.0)
    assert pilot["paired"]["final_average_accuracy"]["mean"] == pytest.approx(10.0)
    text = compare.render(result)
    assert "personalised models" in text and "| pilot | 3 | 62.0 ± 1.0" in text
    assert "| aggregation | shape | color |" in text and "| pilot | 61.0 ± 1.0 | 63.0 ± 1.0 |" in text
