"""A federated run's ``metrics.json``, ``report.md`` and ``rounds.png`` (scores per round).

``metrics.json`` keeps every round (per client: personalised and global score, loss, samples;
the pooled per-task scores; Pilot's aggregation weights) and, for ``tools/compare.py``, the last
round's summary: ``final_average_accuracy`` (mean over clients of the personalised score),
``final_global_accuracy`` (the same for the global model), ``per_task`` (``{"tasks": {task:
score}}`` over every client's test predictions) and ``completed_stages`` / ``stages`` (rounds).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from mil_plugins.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _f(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def summarize(recipe: dict, state: dict) -> dict:
    from mil_plugins.machine import describe as describe_machine

    fed = recipe["federated"]
    history = state["history"]
    last = history[-1] if history else None
    method = "+".join(m["name"] for m in recipe["methods"])
    return {
        "kind": "federated",
        "method": fed["aggregator"] + ("" if method in ("finetune", fed["aggregator"])
                                       else f"+{method}"),
        "aggregator": fed["aggregator"], "methods": [m["name"] for m in recipe["methods"]],
        "recipe": recipe.get("_source", ""), "seed": recipe["train"]["seed"],
        "split": fed["split"], "clients": state["clients"],
        "rounds": fed["rounds"], "completed_rounds": state["round"],
        # tools/compare.py reads these two to know a run is complete
        "stages": [f"round{h['round']}" for h in history], "completed_stages": len(history),
        "final_average_accuracy": _mean(last["personalised"]) if last else None,
        "final_global_accuracy": _mean(last["global"]) if last else None,
        "per_task": {"tasks": last["per_task"]} if last else {},
        "history": history, "warmup_seconds": state.get("warmup_seconds"),
        "seconds": [h["seconds"] for h in history],
        "machine": describe_machine(),
    }


def _curve(metrics: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics["history"]
    rounds = [h["round"] for h in hist]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, c in enumerate(metrics["clients"]):
        ax.plot(rounds, [h["personalised"][i] for h in hist], marker="o", lw=1,
                label=f"{c['name']} ({c['task']})")
    ax.plot(rounds, [_mean(h["personalised"]) for h in hist], color="black", lw=2, label="mean")
    ax.plot(rounds, [_mean(h["global"]) for h in hist], color="black", lw=2, ls="--",
            label="global model, mean")
    ax.set_xticks(rounds)
    ax.set_ylim(0, 100)
    ax.set_xlabel("round")
    ax.set_ylabel("score (0-100)")
    ax.set_title(f"{metrics['method']}: each client's test split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render(metrics: dict) -> str:
    lines = [f"# Federated run: {metrics['method']}", "",
             f"Recipe `{metrics['recipe']}`, split `{metrics['split']}`, "
             f"{len(metrics['clients'])} client(s), {metrics['completed_rounds']}/"
             f"{metrics['rounds']} round(s), seed {metrics['seed']}.", "",
             "| client | task | train samples | test samples |", "|---|---|---:|---:|"]
    for c in metrics["clients"]:
        lines.append(f"| {c['name']} | {c['task']} | {c['train_samples']} | {c['test_samples']} |")
    lines += ["", "Score on each client's test split after each round, personalised model "
              "(global model in brackets):", "",
              "| round | " + " | ".join(c["name"] for c in metrics["clients"]) + " | mean |",
              "|---:|" + "---:|" * (len(metrics["clients"]) + 1)]
    for h in metrics["history"]:
        cells = [f"{_f(p)} ({_f(g)})" for p, g in zip(h["personalised"], h["global"])]
        lines.append(f"| {h['round']} | " + " | ".join(cells)
                     + f" | {_f(_mean(h['personalised']))} ({_f(_mean(h['global']))}) |")
    last = metrics["history"][-1] if metrics["history"] else None
    if last and last.get("aggregation_weights"):
        w = last["aggregation_weights"]
        lines += ["", f"Pilot aggregation weights of the last round (row: client, "
                      f"temperature {w['temperature']:.4g}):", ""]
        lines += ["| | " + " | ".join(f"client-{j}" for j in w["clients"]) + " |",
                  "|---|" + "---:|" * len(w["clients"])]
        for i, row in zip(w["clients"], w["matrix"]):
            lines.append(f"| client-{i} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    if last:
        lines += ["", "Per task over every client's test split (personalised models): "
                  + ", ".join(f"{t} {_f(s)}" for t, s in last["per_task"].items()) + "."]
    lines += ["", "![scores per round](rounds.png)", ""]
    return "\n".join(lines)


def write_federated_report(out: Path, recipe: dict, state: dict) -> dict:
    metrics = summarize(recipe, state)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", render(metrics))
    if metrics["history"]:
        atomic_write_bytes(out / "rounds.png", _curve(metrics))
    return json.loads((out / "metrics.json").read_text())
