"""``mil federate RECIPE [key=value ...]``: run a federated recipe.

    mil federate RECIPE                      Flower's Simulation Engine, federated.clients virtual
                                             clients on this machine (Ray)
    mil federate RECIPE --engine inprocess   the same rounds without Flower (clients one after
                                             another in this process; for debugging)
    mil federate RECIPE --flower-app DIR     write a Flower App for the Deployment Engine (SuperLink
                                             + one SuperNode per client machine; docs/federated.md)
"""

from __future__ import annotations

import argparse
import os

ENGINES = ("simulation", "inprocess")


def add_parser(sub) -> None:
    p = sub.add_parser("federate", help="run a federated recipe on Flower (docs/federated.md)")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federated.rounds=4")
    p.add_argument("--engine", choices=ENGINES, default="simulation")
    p.add_argument("--flower-app", metavar="DIR", help="write a Flower App for `flwr run` "
                   "(Deployment Engine) to DIR instead of running")
    p.add_argument("--resume", action="store_true", help="continue after the last finished round")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output.dir holding another run's results (deletes them)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a recipe key allowed to differ (e.g. train.log_every_steps)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mil_plugins.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.get("federated"):
        raise ValueError(f"{args.recipe}: no `federated:` section; `mil federate` runs federated "
                         f"recipes (docs/federated.md), `mil train` the others")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in output.dir, --overwrite deletes it: "
                         "give one of them")
    threads = os.environ.get("MIL_NUM_THREADS") or recipe["train"]["num_threads"]
    if threads:
        torch.set_num_threads(int(threads))
    if args.flower_app:
        from mil_plugins.integrations.flower.app import write_flower_app

        path = write_flower_app(args.flower_app, args.recipe, args.overrides)
        print(f"[mil] Flower App written to {path}; run it with: flwr run {path} <federation> --stream")
        return 0
    from mil_plugins.federated.server import FederatedServer

    server = FederatedServer(recipe, resume=args.resume, overwrite=args.overwrite,
                             allow_changes=args.allow_change)
    try:
        if args.engine == "inprocess":
            metrics = server.run()
        else:
            from mil_plugins.integrations.flower.app import run_simulation_engine

            metrics = run_simulation_engine(server)
    finally:
        server.folder.release()
    print(f"[mil] done: {server.out / 'report.md'}; mean personalised score "
          f"{metrics.get('final_average_accuracy')}, global {metrics.get('final_global_accuracy')}")
    return 0
