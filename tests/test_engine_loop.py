"""The training loop's pieces: data order, sharding across ranks, the plain backend."""

from __future__ import annotations

import pytest
import torch

from mil_plugins.engine.loop import PlainBackend, epoch_order, rank_micro_batches
from mil_plugins.optim import make_scheduler, param_groups


def test_epoch_order_is_a_seeded_padded_permutation():
    a = epoch_order(10, seed=0, stage_index=1, epoch=0, global_batch=4)
    assert a == epoch_order(10, seed=0, stage_index=1, epoch=0, global_batch=4)
    assert a != epoch_order(10, seed=0, stage_index=1, epoch=1, global_batch=4)
    assert a != epoch_order(10, seed=1, stage_index=1, epoch=0, global_batch=4)
    assert len(a) == 3 and all(len(b) == 4 for b in a)
    flat = [i for b in a for i in b]
    assert set(flat) == set(range(10)) and len(flat) == 12  # wrapped to full batches


def test_ranks_split_each_global_batch_without_overlap():
    batch = list(range(8))
    parts = [rank_micro_batches(batch, r, world=2, accum=2) for r in range(2)]
    assert parts == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert rank_micro_batches(batch, 0, world=1, accum=1) == [batch]


def test_projector_lr_group_and_no_decay_on_biases():
    model = torch.nn.Module()
    model.connector = torch.nn.Linear(2, 2)
    model.llm = torch.nn.Linear(2, 2)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, mm_projector_lr=1e-4)
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_lr == {(1e-3, 0.0): 1, (1e-3, 0.1): 1, (1e-4, 0.0): 1, (1e-4, 0.1): 1}


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_follow_their_shape(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, {"scheduler": kind, "warmup_ratio": 0.2}, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    if kind == "constant":  # HF's constant has no warm-up; the others warm up from 0 (as HF's)
        assert lrs[0] == pytest.approx(1.0)
    else:
        assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    if kind == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.2


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.seen_dtype = None

    def forward(self, batch):
        out = self.lin(batch["x"])
        self.seen_dtype = out.dtype

        class O:
            loss = out.float().pow(2).mean()
        return O


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_plain_backend_accumulates_clips_and_autocasts(precision, dtype):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make_scheduler(opt, {"scheduler": "constant"}, 4)
    backend = PlainBackend(model, opt, sched, accum=2, max_grad_norm=1.0, precision=precision)
    before = model.lin.weight.detach().clone()
    backend.backward(backend.forward({"x": torch.randn(3, 4)}).loss)
    backend.step()
    assert torch.equal(model.lin.weight, before)  # first micro-batch: no step yet
    backend.backward(backend.forward({"x": torch.randn(3, 4)}).loss)
    backend.step()
    assert not torch.equal(model.lin.weight, before) and model.lin.weight.grad is None
    assert model.seen_dtype == dtype


def test_fp16_needs_cuda():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="CUDA"):
        PlainBackend(model, opt, make_scheduler(opt, {"scheduler": "constant"}, 1), 1, 1.0, "fp16")


def test_data_seed_sets_the_batch_order_apart_from_the_seed(tmp_path, monkeypatch):
    """``train.data_seed`` (HF's name) seeds the training batches' order; ``train.seed`` then only
    the rest (initialisation, the methods' draws). Unset, the order follows ``train.seed``."""
    from _tiny_run import tiny_args

    import mil_plugins.engine.loop as loop
    from mil_plugins.engine.run import Runner
    from mil_plugins.recipe import load_recipe

    seen: list[int] = []
    real = loop.epoch_order

    def recording(n, seed, *args, **kwargs):
        seen.append(seed)
        return real(n, seed, *args, **kwargs)

    monkeypatch.setattr(loop, "epoch_order", recording)

    def order_seeds(*extra: str) -> set[int]:
        seen.clear()
        args = tiny_args(tmp_path / "data", tmp_path / f"run{len(list(tmp_path.glob('run*')))}",
                         "warmup=null", *extra, stages=1)
        Runner(load_recipe(args[0], args[1:])).run()
        return set(seen)

    assert order_seeds("train.seed=3") == {3}
    assert order_seeds("train.seed=3", "train.data_seed=7") == {7}
    assert order_seeds("train.seed=4", "train.data_seed=7") == {7}
