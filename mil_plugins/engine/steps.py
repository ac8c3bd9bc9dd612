"""What every runner does, as functions over a :class:`~mil_plugins.engine.session.Session`.

The stage runner (:class:`~mil_plugins.engine.run.Runner`: stage after stage) and the federated
runner (:mod:`mil_plugins.federated`: clients train, a server aggregates) call these in their own
order: generate the data a recipe asks for, plan one stage (or one client's local epochs), train
it with the method hooks, score samples. Checkpoints are :mod:`mil_plugins.engine.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path

from mil_plugins.engine.loop import StagePlan, train_stage
from mil_plugins.engine.trainable import apply_trainable, group_names


def prepare_data(recipe: dict, dist) -> None:
    """Generate the built-in benchmark where ``data.generate`` asks for it (rank 0, then a barrier),
    then the encoders' pretrained weights where ``encoder_pretraining`` asks for them (the recipe
    then names them in ``modalities.<m>.encoder_weights``)."""
    from mil_plugins.engine.encoder_pretraining import apply_encoder_pretraining

    gen = recipe["data"]["generate"]
    if gen is not None:
        if dist.is_main:
            from mil_plugins.benchmark import make_benchmark
            make_benchmark(Path(recipe["data"]["root"]), size=gen["size"], seed=gen["seed"],
                           sequence=gen.get("sequence", "modality"))
        dist.barrier()
    apply_encoder_pretraining(recipe, dist, log=print if dist.is_main else (lambda *_: None))


def _pick(cfg: dict, train: dict, key: str):
    return cfg.get(key) if cfg.get(key) is not None else train[key]


def stage_plan(key: str, index: int, samples: list, cfg: dict, train: dict) -> StagePlan:
    """A stage's plan: ``cfg`` (the stage's entry) wins over ``train`` for epochs, steps and lrs."""
    return StagePlan(key, index, samples, _pick(cfg, train, "epochs"), _pick(cfg, train, "max_steps"),
                     _pick(cfg, train, "lr"), _pick(cfg, train, "mm_projector_lr"))


def trainable_names(session, groups, modalities, stage) -> set[str]:
    """The recipe's trainable ``groups`` resolved for every modality in ``modalities`` (their
    union), then passed through the methods' ``trainable`` hooks."""
    names: set[str] = set()
    for m in modalities or [None]:
        names |= group_names(session.model, groups, m)
    return session.hooks.trainable(stage, names)


def train_plan(session, plan: StagePlan, names: set[str], logger, hooks=None) -> dict:
    """Train ``plan`` from scratch (no mid-stage checkpoints), ``names`` trainable; returns
    :func:`~mil_plugins.engine.loop.train_stage`'s result plus ``trainable_parameters``."""
    count = apply_trainable(session.model, names)
    result = train_stage(ctx=session.ctx, plan=plan, methods=hooks or session.hooks,
                         dataset=session.dataset(plan.samples, "train"),
                         collate=session.collator("train"), train_cfg=session.recipe["train"],
                         dist=session.dist, ds_config=None, logger=logger)
    result["trainable_parameters"] = count
    return result


def evaluate_samples(session, samples: list, desc: str = "eval", with_rows: bool = False) -> dict:
    """Answer ``samples`` (generated, or chosen as ``eval.choices`` says) and score them (:func:`~mil_plugins.evaluate.score_predictions`);
    ``with_rows`` adds the predictions under ``"rows"``."""
    from mil_plugins.evaluate import predict, score_predictions

    ev = session.recipe["eval"]
    rows = predict(session.model, samples, session.make_loader, methods=session.hooks,
                   ctx=session.ctx, dist=session.dist, batch_size=ev["batch_size"],
                   max_new_tokens=ev["max_new_tokens"], desc=desc,
                   options=session.answer_options(samples))
    scored = score_predictions(rows)
    if with_rows:
        scored["rows"] = rows
    return scored
