"""``replay``: a rehearsal buffer of earlier stages' training samples.

Experience replay (Rolnick et al., 2019, "Experience Replay for Continual Learning"; for MLLMs
see He et al., 2023, arXiv 2311.16206). After each stage, some of its training samples are kept in
a buffer; every later stage trains on its own samples plus the buffer.

Hooks:
  ``after_stage``    update the buffer with the stage just trained (seeded, see below)
  ``train_samples``  the stage's samples + the buffer's samples (``mix: concat``; the training
                     loop shuffles the list, so replayed samples are spread over every batch)
  ``trainable``      the per-modality parts (input layer / projector) of replayed modalities
                     train too, so their samples update what the recipe trains for them

Budget (one of):
  ``ratio`` (default 0.1): each finished stage adds ``max(1, round(ratio * n_stage))`` of its
      samples; nothing is evicted, the buffer grows with the stages.
  ``size`` (an int, overrides ``ratio``): a fixed total number of buffered samples.

``strategy``:
  ``reservoir`` (default): one pool. With ``size``: reservoir sampling over the stream of every
      training sample seen so far (each is equally likely to be in the buffer). With ``ratio``: a
      uniform draw from each stage.
  ``balanced``: per-modality pools (a sample's modality group is its sorted modalities, ``text``
      when it has none). With ``size``: the slots are split equally over the groups seen so far
      (remainder to the earliest groups), each group a reservoir of its own samples; when a new
      group arrives, the others give up slots by uniform eviction. With ``ratio``: a stage's quota
      is split equally over the groups present in that stage (a stratified draw).

The buffer holds ``[stage name, index in that stage's train_samples, sample id]`` entries only (it
is saved with every checkpoint) and is resolved back to ``Sample`` objects from
``ctx.stages[...].train_samples``, so a resumed run replays exactly the same samples. Every draw
uses ``ctx.generator`` (seeded by the run's seed and the stage).
"""

from __future__ import annotations

import torch

from mil_plugins.methods._common import modality_parameters, salt
from mil_plugins.methods.base import Method

STRATEGIES = ("reservoir", "balanced")
MIXES = ("concat",)


def _group(sample) -> str:
    media = getattr(sample, "media", None) or {}
    mods = sorted(m for m, files in media.items() if files)
    return "+".join(mods) if mods else "text"


def _split(total: int, n: int) -> list[int]:
    """``total`` slots over ``n`` groups, equally, the remainder to the first groups."""
    base, rest = divmod(total, n) if n else (0, 0)
    return [base + (1 if i < rest else 0) for i in range(n)]


class Replay(Method):
    name = "replay"
    default_options = {
        "ratio": 0.1,         # per stage: fraction of its training samples kept (when size is null)
        "size": None,         # fixed total buffer size (overrides ratio)
        "strategy": "reservoir",
        "mix": "concat",
    }
    conflicts = {
        "joint": "joint already trains on every stage's data (a replay buffer adds nothing)",
        "expansion": "expansion freezes each earlier stage's adapter and routes that modality to "
                     "it, so replayed samples would train nothing",
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["strategy"] not in STRATEGIES:
            raise ValueError(f"method 'replay': strategy must be one of {STRATEGIES}, "
                             f"got {o['strategy']!r}")
        if o["mix"] not in MIXES:
            raise ValueError(f"method 'replay': mix must be one of {MIXES}, got {o['mix']!r}")
        if o["size"] is not None and (isinstance(o["size"], bool) or not isinstance(o["size"], int)
                                      or o["size"] < 0):
            raise ValueError(f"method 'replay': size must be a non-negative integer or null, "
                             f"got {o['size']!r}")
        if o["size"] is None and not (isinstance(o["ratio"], (int, float)) and 0 <= o["ratio"] <= 1):
            raise ValueError(f"method 'replay': ratio must be a number in [0, 1], got {o['ratio']!r}")
        # group -> list of [stage name, index, sample id]; insertion order = order groups arrived
        self.pools: dict[str, list[list]] = {}
        # group -> number of samples of that group seen so far (reservoir sampling's counter)
        self.counts: dict[str, int] = {}

    # ---- the buffer --------------------------------------------------------------------------
    @property
    def memory(self) -> list[list]:
        """Every buffered entry ``[stage name, index, sample id]``, groups in arrival order."""
        return [entry for pool in self.pools.values() for entry in pool]

    def _add_stage(self, ctx, stage) -> None:
        samples = list(stage.train_samples)
        if not samples:
            return
        g = ctx.generator(salt("replay", stage.name))
        order = torch.randperm(len(samples), generator=g).tolist()
        balanced = self.options["strategy"] == "balanced"
        by_group: dict[str, list[int]] = {}
        for i in order:
            by_group.setdefault(_group(samples[i]) if balanced else "all", []).append(i)
        entries = {grp: [[stage.name, i, str(samples[i].id)] for i in idx]
                   for grp, idx in by_group.items()}
        if self.options["size"] is None:
            quota = max(1, round(self.options["ratio"] * len(samples))) if self.options["ratio"] else 0
            groups = sorted(entries)
            for grp, share in zip(groups, _split(quota, len(groups))):
                self.pools.setdefault(grp, []).extend(entries[grp][:share])
                self.counts[grp] = self.counts.get(grp, 0) + len(entries[grp])
            return
        for grp in sorted(entries):
            self.pools.setdefault(grp, [])
            self.counts.setdefault(grp, 0)
        caps = dict(zip(self.pools, _split(int(self.options["size"]), len(self.pools))))
        for grp, pool in self.pools.items():  # shrink groups whose share went down
            while len(pool) > caps[grp]:
                pool.pop(int(torch.randint(len(pool), (1,), generator=g)))
        for grp in sorted(entries):  # reservoir sampling within each group
            pool, cap = self.pools[grp], caps[grp]
            for entry in entries[grp]:
                self.counts[grp] += 1
                if len(pool) < cap:
                    pool.append(entry)
                elif cap:
                    j = int(torch.randint(self.counts[grp], (1,), generator=g))
                    if j < cap:
                        pool[j] = entry

    def _resolve(self, ctx) -> list:
        by_name = {st.name: st for st in ctx.stages}
        out = []
        for stage_name, index, sample_id in self.memory:
            stage = by_name.get(stage_name)
            if stage is None:
                raise KeyError(f"method 'replay': the buffer holds samples of stage {stage_name!r}, "
                               f"which the recipe no longer has")
            pool = stage.train_samples
            if index < len(pool) and str(pool[index].id) == sample_id:
                out.append(pool[index])
                continue
            found = [s for s in pool if str(s.id) == sample_id]
            if not found:
                raise KeyError(f"method 'replay': buffered sample {sample_id!r} of stage "
                               f"{stage_name!r} is not in that stage's training data any more "
                               f"(was the manifest or data.max_train_samples changed?)")
            out.append(found[0])
        return out

    # ---- hooks -------------------------------------------------------------------------------
    def train_samples(self, ctx, stage, samples):
        return list(samples) + self._resolve(ctx)

    def trainable(self, ctx, stage, names):
        # replayed modalities train their own parts too (input layer / projector), as in joint
        return names | modality_parameters(ctx, stage, self._resolve(ctx))

    def after_stage(self, ctx, stage):
        if stage.index < 0:
            return
        self._add_stage(ctx, stage)

    def state_dict(self):
        return {"pools": {g: [list(e) for e in pool] for g, pool in self.pools.items()},
                "counts": dict(self.counts)}

    def load_state_dict(self, state):
        pools = state.get("pools") or {}
        self.pools = {g: [[str(e[0]), int(e[1]), str(e[2])] for e in pool] for g, pool in pools.items()}
        self.counts = {g: int(n) for g, n in (state.get("counts") or {}).items()}
