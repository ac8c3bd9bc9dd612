"""Issue #10's acceptance, at test scale: the quickstart's default regime.

1. Each built-in encoder, pretrained with the quickstart's ``encoder_pretraining`` settings (at a
   CI scale: the benchmark at size ``small``, seed 1, fewer steps), keeps its modality's
   attributes: a linear probe on its tokens is not below a linear probe on the raw, downsampled
   input on any task; audio and point encoders are clearly above it on at least one task already
   at this scale (the others at the quickstart's scale: ``WINS_AT_TEST_SCALE``).
2. The default regime (the quickstart's model, shared connector with standardised, mixed tokens,
   LoRA, text warm-up) learns a two-modality toy, image colour then audio pitch, through the real
   :class:`~mil_plugins.engine.run.Runner`, to at least 0.9 of the encoder probe of those tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _shared import benchmark, copy_of
from mil_plugins.data.manifest import load_manifest
from mil_plugins.engine.encoder_pretraining import pretrained_weights
from mil_plugins.modality import ENCODER_WEIGHTS
from mil_plugins.plugins import MODALITIES
from mil_plugins.probe import pooled_raw, probe_tasks, vectors
from mil_plugins.recipe import load_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
MODALITY_NAMES = ("image", "video", "audio", "depth", "point")

#: pretraining steps at test scale (the quickstart: 1500, image 4000, depth 3000, point 400, on
#: the full set)
STEPS = 100
STEPS_BY_MODALITY = {"image": 600, "point": 80}
#: a probe on the encoder may sit this far below the raw probe on a task both read equally well
#: (e.g. both near chance for 2-D shape at 32x32): with 144 test samples per task (small split) the
#: standard error of a 3-class accuracy near 40% is ~4 points, so 5 points is noise, not a loss
NOISE = 5.0
#: the clear win required on at least one task of the modalities that show one at test scale
#: (above two standard errors)
CLEAR = 8.0
#: Where the encoder must beat raw input at test scale. Measured with this test (100 steps, image
#: 600, point 80, on the `small` set: 96 training samples per task): audio count and point
#: caption/shape win by 15-40 points; image, video and depth tie raw input on every task (image
#: shape 40.3 vs 39.6, video shape 44.4 vs 45.8, depth caption 59.9 vs 57.6; colour, direction,
#: distance and side are read perfectly by both). Their wins need the quickstart's pretraining
#: (1500-4000 steps on the `full` set, 3024 samples a modality): image shape 92 vs 40, video shape
#: 87 vs 48, depth caption 82 vs 60 in docs/probe-gap.md (bench/probe_gap.py), a minute or more a
#: modality, too slow for this suite. Here they must keep what raw input carries.
WINS_AT_TEST_SCALE = {"audio", "point"}


def _probe_samples(root: Path, modality: str, plugin, split: str, per_task: int) -> list:
    """The first ``per_task`` samples of every task of a split (the probe's cost is per sample)."""
    samples = list(load_manifest(root / modality / f"{split}.json", root, {modality: plugin}).samples)
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        t = s.task or "default"
        if seen.get(t, 0) < per_task:
            seen[t] = seen.get(t, 0) + 1
            out.append(s)
    return out


@pytest.fixture(scope="module")
def roots() -> tuple[Path, Path]:
    """(pretraining set: small, seed 1) and (probe set: small, seed 0), no file shared; both
    shared read-only with the other tests of the run."""
    return (benchmark("small", seed=1, modalities=MODALITY_NAMES),
            benchmark("small", seed=0, modalities=MODALITY_NAMES))


#: the default tier probes three modalities (audio: a clear win at this scale; image and video:
#: ties); depth and point, whose probes are the costly ones (~80 s each: sklearn's cross-validated
#: fits on their features), run in the extended tier (``pytest --extended``)
EXTENDED_MODALITIES = ("depth", "point")


@pytest.mark.parametrize("modality", [
    pytest.param(m, marks=pytest.mark.extended) if m in EXTENDED_MODALITIES else m
    for m in MODALITY_NAMES])
def test_pretrained_encoder_keeps_what_raw_input_carries(modality, roots, tmp_path):
    pre, probe_root = roots
    recipe = load_recipe(QUICKSTART, [
        f"data.root={tmp_path / 'unused'}", f"output.dir={tmp_path / 'run'}",
        f"encoder_pretraining.data.root={pre}", "encoder_pretraining.data.generate=null",
        f"encoder_pretraining.dir={tmp_path / 'encoders'}", "encoder_pretraining.workers=1",
        f"encoder_pretraining.steps={STEPS}",
        f"encoder_pretraining.steps_by_modality={json.dumps(STEPS_BY_MODALITY)}"])
    torch.set_num_threads(1)
    weights = pretrained_weights(recipe, modality, log=lambda *_: None)
    options = {**(recipe["modalities"].get(modality) or {}), ENCODER_WEIGHTS: str(weights)}
    plugin = MODALITIES.get(modality)(**options)
    encoder = plugin.make_encoder().eval()
    key = plugin.manifest_key
    train = _probe_samples(probe_root, modality, plugin, "train", 96)
    test = _probe_samples(probe_root, modality, plugin, "test", 144)

    def encoded(sample):
        return encoder(plugin.collate([plugin.preprocess(sample.media[key][0])]))[0]

    def raw(sample):
        return pooled_raw(plugin.preprocess(sample.media[key][0]))

    with torch.no_grad():
        enc = probe_tasks(vectors(train, encoded), vectors(test, encoded))
        rw = probe_tasks(vectors(train, raw), vectors(test, raw))
    report = {t: {"encoder": round(enc[t], 1), "raw": round(rw[t], 1)} for t in enc}
    print(f"[{modality}] {report}")
    assert set(enc) == set(rw) and len(enc) >= 2, report
    behind = {t: v for t, v in report.items() if v["encoder"] < v["raw"] - NOISE}
    assert not behind, f"{modality}: encoder probe below the raw probe: {behind}"
    if modality in WINS_AT_TEST_SCALE:
        assert any(v["encoder"] >= v["raw"] + CLEAR for v in report.values()), \
            f"{modality}: the encoder adds nothing over raw input on any task: {report}"


#: the toy: one task per modality, each read perfectly by a linear probe on the tokens
TOY = {"image": "color", "audio": "pitch"}


def test_default_regime_learns_a_two_modality_toy_to_near_its_probe(tmp_path):
    # the quickstart's size (small): 144 training samples per task, so 54 steps per stage (tiny's 16
    # samples give 6 steps, and image colour reached only 62.5 of a probe's 100)
    root = copy_of(benchmark("small", seed=0, modalities=[*TOY, "text"]), tmp_path / "bench")
    for m, task in TOY.items():
        for split in ("train", "test"):
            rows = json.loads((root / m / f"{split}.json").read_text())
            (root / m / f"{split}_{task}.json").write_text(
                json.dumps([r for r in rows if r["task"] == task]))
    quick = yaml.safe_load(QUICKSTART.read_text())
    stages = [{"name": m, "modality": m, "train": f"{m}/train_{t}.json",
               "test": f"{m}/test_{t}.json"} for m, t in TOY.items()]
    modalities = {m: quick["modalities"].get(m) or {} for m in TOY}
    recipe = load_recipe(QUICKSTART, [
        f"data.root={root}", "data.generate=null", f"output.dir={tmp_path / 'run'}",
        "output.tensorboard=false", "encoder_pretraining=null",
        f"modalities={json.dumps(modalities)}", f"stages={json.dumps(stages)}",
        "data.max_test_samples=48"])
    from mil_plugins.engine.run import Runner

    metrics = Runner(recipe).run()

    # the ceiling: a linear probe on the same frozen encoder's tokens (random towers: no pretraining)
    for i, (m, task) in enumerate(TOY.items()):
        plugin = MODALITIES.get(m)(**modalities[m])
        encoder = plugin.make_encoder().eval()
        train = list(load_manifest(root / m / f"train_{task}.json", root, {m: plugin}).samples)
        test = list(load_manifest(root / m / f"test_{task}.json", root, {m: plugin}).samples)
        with torch.no_grad():
            feats = lambda s: encoder(plugin.collate([plugin.preprocess(s.media[m][0])]))[0]  # noqa: E731
            probe = probe_tasks(vectors(train, feats), vectors(test, feats))[task]
        # the stage's score right after it was trained (sequential fine-tuning forgets image later;
        # metrics' per_task holds only the last stage's row): one task per stage, so the diagonal
        mllm = metrics["accuracy_matrix"][i][i]
        print(f"[toy] {m} {task}: MLLM {mllm:.1f}, encoder probe {probe:.1f}")
        assert mllm >= 0.9 * probe, (m, task, mllm, probe, metrics["per_task"])
