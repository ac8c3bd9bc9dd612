"""Which client holds which data: the recipe's stages pooled, then split over ``clients``.

A federated recipe's ``stages`` are the data pools (one manifest pair per modality); the
``federated.split`` says how their samples are dealt to the clients, deterministically from the
recipe (every process computes the same split, so only a client's index crosses the wire):

``task``      each (modality, task) group goes whole to one client, groups dealt round-robin in
              recipe order; one client per task when there are as many groups as clients
``modality``  each stage (modality) goes whole to one client, round-robin
``dirichlet`` per label value (``dirichlet_label``: the sample's task or its answer), the shares
              of the clients are drawn from Dirichlet(``dirichlet_alpha``); seeded by train.seed
``pooled``    every client gets everything (``clients: 1`` is centralised training)

A client's test samples are those of its own groups (``task``/``modality``), or the whole pooled
test set (``dirichlet``/``pooled``). Its *task key* names what Pilot's task branch and CT-MoA
expert follow: the group's ``modality/task`` (or the modality), else the client's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClientData:
    index: int
    name: str
    task: str                       # Pilot's task key
    modalities: list[str]           # modalities of its samples (for trainable groups)
    train_samples: list = field(default_factory=list)
    test_samples: list = field(default_factory=list)


def _key(stage, sample, by: str) -> str:
    modality = stage.modality or "text"
    return modality if by == "modality" else f"{modality}/{sample.task or 'default'}"


def _groups(stages, by: str, split: str) -> dict[str, tuple[list, list]]:
    groups: dict[str, tuple[list, list]] = {}
    for stage in stages:
        for which, samples in ((0, stage.train_samples), (1, stage.test_samples)):
            for s in samples:
                groups.setdefault(_key(stage, s, by), ([], []))[which].append((stage, s))
    return groups


def _modalities(pairs) -> list[str]:
    return list(dict.fromkeys(st.modality for st, _ in pairs if st.modality))


def split_clients(section: dict, stages: list, seed: int) -> list[ClientData]:
    """The clients of ``section`` (a recipe's ``federated``) over the loaded ``stages``."""
    n, how = int(section["clients"]), section["split"]
    if not any(st.train_samples for st in stages):
        raise ValueError("federated: the stages hold no training samples to split over clients")
    clients = [ClientData(i, f"client-{i}", f"client-{i}", []) for i in range(n)]
    if how in ("task", "modality"):
        groups = _groups(stages, "modality" if how == "modality" else "task", how)
        if len(groups) < n:
            raise ValueError(f"federated.split {how}: {len(groups)} group(s) "
                             f"({', '.join(groups)}) for {n} clients; give at most {len(groups)} "
                             f"clients or another split")
        owned: list[list[str]] = [[] for _ in range(n)]
        for k, key in enumerate(groups):
            owned[k % n].append(key)
        for c, keys in zip(clients, owned):
            train = [p for key in keys for p in groups[key][0]]
            test = [p for key in keys for p in groups[key][1]]
            c.task = "+".join(keys)
            c.modalities = _modalities(train)
            c.train_samples = [s for _, s in train]
            c.test_samples = [s for _, s in test]
        return clients
    pooled_train = [(st, s) for st in stages for s in st.train_samples]
    pooled_test = [s for st in stages for s in st.test_samples]
    if how == "pooled":
        for c in clients:
            c.train_samples = [s for _, s in pooled_train]
            c.modalities = _modalities(pooled_train)
            c.test_samples = list(pooled_test)
        return clients
    if how != "dirichlet":
        raise ValueError(f"federated.split must be task, modality, dirichlet or pooled; got {how!r}")
    rng = np.random.default_rng(seed)
    label_of = (lambda st, s: s.task or "default") if section["dirichlet_label"] == "task" else \
        (lambda st, s: next((t["value"] for t in s.conversations if t["from"] == "gpt"), ""))
    by_label: dict[str, list] = {}
    for st, s in pooled_train:
        by_label.setdefault(label_of(st, s), []).append((st, s))
    parts: list[list] = [[] for _ in range(n)]
    for label in sorted(by_label):
        items = by_label[label]
        order = rng.permutation(len(items))
        shares = rng.dirichlet([float(section["dirichlet_alpha"])] * n)
        cuts = (np.cumsum(shares)[:-1] * len(items)).round().astype(int)
        for c, idx in enumerate(np.split(order, cuts)):
            parts[c].extend(items[i] for i in idx)
    for c, part in zip(clients, parts):
        if not part:
            raise ValueError(f"federated.split dirichlet: client {c.index} got no samples "
                             f"(alpha {section['dirichlet_alpha']}); raise dirichlet_alpha or "
                             f"lower clients")
        c.train_samples = [s for _, s in part]
        c.modalities = _modalities(part)
        c.test_samples = list(pooled_test)
    return clients


def task_keys(clients: list[ClientData]) -> list[str]:
    """The distinct task keys, in client order (Pilot's task branches / CT-MoA experts)."""
    return list(dict.fromkeys(c.task for c in clients))
