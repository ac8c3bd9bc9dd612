"""Bad inputs of every kind end in one clear line naming the file, key or sample -- never in a
traceback, never accepted silently.

One table per kind: recipes, manifests, media of all five modalities, checkpoints and plugins.
Each case asserts the error type the CLI shows as one ``mil: error: ...`` line (a ``ValueError`` /
``LookupError``), that the message is one line, and that it names what is wrong.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mil_plugins.modality import ModalityInputError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---- recipes --------------------------------------------------------------------------------------

RECIPE_CASES = [
    # (override, key in the message, words in the message)
    ("train.epochs=0", "train.epochs", "> 0"),
    ("train.epochs=-2", "train.epochs", "> 0"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.batch_size=-16", "train.batch_size", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.log_every_steps=0", "train.log_every_steps", ">= 1"),
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens", ">= 1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm", ">= 0"),
    ("train.lr=nan", "train.lr", "not a finite number"),
    ("train.lr=.inf", "train.lr", "not a finite number"),
    ("train.lr=-1e-3", "train.lr", ">= 0"),
    ("train.warmup_ratio=5", "train.warmup_ratio", "<= 1"),
    ("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
    ("train.save_every_steps=-1", "train.save_every_steps", ">= 0"),
    ("train.num_threads=0", "train.num_threads", ">= 1"),
    ("stages.0.epochs=0", "stages.0.epochs", "> 0"),
    ("stages.1.lr=-1", "stages.1.lr", ">= 0"),
    ("stages.0.max_steps=0", "stages.0.max_steps", ">= 1"),
    ("warmup.epochs=0", "warmup.epochs", "> 0"),
    ("model.max_length=0", "model.max_length", ">= 1"),
    ("data.max_train_samples=0", "data.max_train_samples", ">= 1"),
    ("output.dir=", "output.dir", "must not be empty"),
    ("data.root=", "data.root", "must not be empty"),
    ("stages.0.name=../../elsewhere", "stages.0.name", "checkpoint folder"),
    ("=5", "=5", "key.path=value"),
    ("train..lr=1", "train..lr=1", "key.path=value"),
    ("train.lr.x=1", "train.lr.x", "non-mapping"),
    ("stages.9.lr=1", "stages.9", "not an index"),
    ("data.preflight=sometimes", "data.preflight", "not one of"),
]


@pytest.mark.parametrize("override, key, words", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_values(override, key, words):
    from mil_plugins.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, [override])
    text = one_line(err.value)
    assert err.value.key == key and words in text


YAML_CASES = {
    "duplicate-key": ("train:\n  lr: 1\n  lr: 2\n", "duplicate key 'lr'"),
    "duplicate-section": ("train: {lr: 1}\ntrain: {lr: 2}\n", "duplicate key 'train'"),
    "json-duplicate": ('{"train": {"lr": 1, "lr": 2}}', "duplicate key 'lr'"),
    "alias-bomb": ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)),
        "more than 100000 values"),
    "many-aliases": ("a: &a 1\nb: [" + ", ".join(["*a"] * 150) + "]\n", "more than 100 YAML aliases"),
    "not-utf8": (b"train: {lr: \xff}\n", "not UTF-8"),
    "python-object": ("output: !!python/object/apply:os.system ['echo x']\n", "invalid YAML"),
}


@pytest.mark.parametrize("name", YAML_CASES)
def test_bad_recipe_files(tmp_path, name):
    from mil_plugins.recipe import RecipeError, load_recipe

    text, words = YAML_CASES[name]
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = one_line(err.value)
    assert str(path) in msg and words in msg


# ---- manifests ------------------------------------------------------------------------------------

def _png(path: Path, value: int = 128) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path


def _conv(answer="a", question="<image>\nq"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _manifest_case(root: Path, name: str) -> tuple[str, str]:
    """Write ``root/m.json`` with one good and one bad sample; returns (bad id, words)."""
    _png(root / "img" / "a.png")
    good = {"id": "good", "image": "img/a.png", "conversations": _conv()}
    bad = {"id": "bad", "image": "img/a.png", "conversations": _conv()}
    words = ""
    raw = None
    if name == "symlink-outside":
        outside = _png(root.parent / "outside.png")
        (root / "img" / "link.png").symlink_to(outside)
        bad["image"], words = "img/link.png", "points outside the data root"
    elif name == "symlinked-folder-outside":
        (root.parent / "elsewhere").mkdir()
        _png(root.parent / "elsewhere" / "b.png")
        (root / "img" / "sub").symlink_to(root.parent / "elsewhere")
        bad["image"], words = "img/sub/b.png", "points outside the data root"
    elif name == "lone-surrogate":
        bad["conversations"] = _conv(answer="a\ud800")
        words = "unpaired surrogate"
    elif name == "surrogate-in-question":
        bad["conversations"] = _conv(question="<image>\nwhat\udfff")
        words = "unpaired surrogate"
    elif name == "duplicate-key":
        raw = json.dumps([good, bad]).replace('"id": "bad",', '"id": "bad", "image": "x.png",')
        words = "duplicate key 'image'"
    elif name == "escapes-root":
        bad["image"], words = "../a.png", "escapes the data root"
    elif name == "missing-file":
        bad["image"], words = "img/none.png", "media file missing"
    elif name == "placeholder-count":
        bad["conversations"] = _conv(question="q without placeholder")
        words = "placeholder"
    elif name == "unknown-metric":
        bad["metric"], words = "accuracy", "unknown metric 'accuracy'"
    elif name == "corrupt-image":
        (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        bad["image"], words = "img/bad.png", "bad.png"
    elif name == "unknown-key":
        bad["imagee"], words = "img/a.png", "unknown key 'imagee'"
    elif name == "ends-with-human":
        bad["conversations"] = _conv() + [{"from": "human", "value": "more?"}]
        words = "must end with the gpt answer"
    else:
        raise KeyError(name)
    (root / "m.json").write_text(raw if raw is not None else json.dumps([good, bad]))
    return "bad", words


MANIFEST_CASES = ["symlink-outside", "symlinked-folder-outside", "lone-surrogate",
                  "surrogate-in-question", "duplicate-key", "escapes-root", "missing-file",
                  "placeholder-count", "unknown-metric", "corrupt-image", "unknown-key",
                  "ends-with-human"]


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_bad_manifest_samples_are_named_by_check_data(tmp_path, name):
    from encoders.image import ImagePlugin
    from mil_plugins.data.check import check_manifest

    root = tmp_path / "data"
    root.mkdir()
    bad_id, words = _manifest_case(root, name)
    report = check_manifest(root / "m.json", root, {"image": ImagePlugin()}, workers=1)
    assert [b.id for b in report.bad] == [bad_id], report.format()
    line = report.bad[0].line()
    assert "\n" not in line and words in line, line


def test_surrogate_sample_is_refused_by_training_loader_too(tmp_path):
    from encoders.image import ImagePlugin
    from mil_plugins.data import load_manifest
    from mil_plugins.data.errors import DataError

    root = tmp_path / "data"
    root.mkdir()
    _manifest_case(root, "lone-surrogate")
    with pytest.raises(DataError) as err:
        load_manifest(root / "m.json", root, {"image": ImagePlugin()})
    assert "sample 'bad'" in one_line(err.value) and "m.json" in str(err.value)


# ---- media of all five modalities ---------------------------------------------------------------

def _ply(path: Path, rows: list[str], props=("x", "y", "z")) -> Path:
    head = ["ply", "format ascii 1.0", f"element vertex {len(rows)}",
            *[f"property float {p}" for p in props], "end_header"]
    path.write_text("\n".join(head + rows) + "\n")
    return path


def _float_tiff(path: Path, nan: bool) -> Path:
    from PIL import Image

    a = np.random.default_rng(0).random((24, 24)).astype(np.float32)
    if nan:
        a[5, 5] = np.nan
    Image.fromarray(a, mode="F").save(path)
    return path


def _wav(path: Path, samples: np.ndarray, rate=16000, subtype="FLOAT") -> Path:
    import soundfile as sf

    sf.write(str(path), samples, rate, subtype=subtype)
    return path


def _media_case(folder: Path, name: str):
    """(plugin, path, words) for one bad media file."""
    from encoders.audio import AudioPlugin
    from encoders.depth import DepthPlugin
    from encoders.image import ImagePlugin
    from encoders.point import PointCloudPlugin
    from encoders.video import VideoPlugin

    p = folder / name
    if name == "image-nan.tiff":
        return ImagePlugin(), _float_tiff(p, True), "NaN or infinite"
    if name == "image-truncated.png":
        good = _png(folder / "full.png").read_bytes()
        p.write_bytes(good[: len(good) // 2])
        return ImagePlugin(), p, "image"
    if name == "image-text.png":
        p.write_text("hello")
        return ImagePlugin(), p, "not an image"
    if name == "image-empty.png":
        p.write_bytes(b"")
        return ImagePlugin(), p, "empty file"
    if name == "video-garbage.mp4":
        p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
        return VideoPlugin(), p, "video-garbage.mp4"
    if name == "video-empty.mp4":
        p.write_bytes(b"")
        return VideoPlugin(), p, "empty file"
    if name == "video-still.mp4":
        _png(p.with_suffix(".png"))
        p.write_bytes(p.with_suffix(".png").read_bytes())
        return VideoPlugin(), p, "video-still.mp4"
    if name == "audio-nan.wav":
        y = np.zeros(1600, np.float32)
        y[10] = np.nan
        return AudioPlugin(), _wav(p, y), "NaN or infinite"
    if name == "audio-zero-length.wav":
        return AudioPlugin(), _wav(p, np.zeros(0, np.float32)), "audio-zero-length.wav"
    if name == "audio-garbage.wav":
        p.write_bytes(b"RIFF" + bytes(40))
        return AudioPlugin(), p, "soundfile"
    if name == "depth-colour.png":
        from PIL import Image

        Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(p)
        return DepthPlugin(), p, "colour image"
    if name == "depth-all-zero.png":
        from PIL import Image

        Image.fromarray(np.zeros((16, 16), np.uint16)).save(p)
        return DepthPlugin(), p, "no valid depth pixel"
    if name == "depth-all-nan.tiff":
        from PIL import Image

        Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(p)
        return DepthPlugin(), p, "no valid depth pixel"
    if name == "point-identical.ply":
        return PointCloudPlugin(use_colors=False), _ply(p, ["0.1 0.2 0.3"] * 64), "same place"
    if name == "point-identical.npy":
        np.save(p, np.full((64, 3), 0.7))
        return PointCloudPlugin(use_colors=False), p, "same place"
    if name == "point-word.ply":
        rows = ["0.1 0.2 0.3"] * 10 + ["0.1 abc 0.3"] + [f"{i} {i} {-i}" for i in range(8)]
        return PointCloudPlugin(use_colors=False), _ply(p, rows), "'abc' is not a number"
    if name == "point-short-line.ply":
        rows = [f"{i} {i % 3} {i % 5}" for i in range(10)] + ["0.1 0.2"] + ["1 2 3"] * 4
        return PointCloudPlugin(use_colors=False), _ply(p, rows), "has 2 values"
    if name == "point-no-colours.ply":
        rows = [f"{i} {i % 3} {i % 5}" for i in range(20)]
        return PointCloudPlugin(use_colors=True), _ply(p, rows), "no colours"
    if name == "point-nan.npy":
        a = np.random.default_rng(0).random((32, 3))
        a[3, 1] = np.nan
        np.save(p, a)
        return PointCloudPlugin(use_colors=False), p, "NaN or infinite"
    if name == "point-wrong-shape.npy":
        np.save(p, np.zeros((10, 4)))
        return PointCloudPlugin(use_colors=False), p, "[N, 3]"
    raise KeyError(name)


MEDIA_CASES = ["image-nan.tiff", "image-truncated.png", "image-text.png", "image-empty.png",
               "video-garbage.mp4", "video-empty.mp4", "video-still.mp4",
               "audio-nan.wav", "audio-zero-length.wav", "audio-garbage.wav",
               "depth-colour.png", "depth-all-zero.png", "depth-all-nan.tiff",
               "point-identical.ply", "point-identical.npy", "point-word.ply",
               "point-short-line.ply", "point-no-colours.ply", "point-nan.npy",
               "point-wrong-shape.npy"]


@pytest.mark.parametrize("name", MEDIA_CASES)
def test_bad_media_name_the_file(tmp_path, name):
    plugin, path, words = _media_case(tmp_path, name)
    with pytest.raises(ModalityInputError) as err:
        plugin.preprocess(path)
    text = one_line(err.value)
    assert str(path) in text and words in text, text


def test_ascii_ply_problems_are_the_same_every_time(tmp_path):
    """The reader used to return uninitialised values for a bad vertex line."""
    plugin, path, _ = _media_case(tmp_path, "point-word.ply")
    messages = set()
    for _ in range(3):
        with pytest.raises(ModalityInputError) as err:
            plugin.preprocess(path)
        messages.add(str(err.value))
    assert len(messages) == 1


def test_float_depth_with_some_nan_is_still_read(tmp_path):
    """NaN in a depth map means "no depth here", not a bad file."""
    from encoders.depth import DepthPlugin

    out = DepthPlugin().preprocess(_float_tiff(tmp_path / "d.tiff", nan=True))
    assert torch.isfinite(out).all()


# ---- checkpoints ----------------------------------------------------------------------------------

def _checkpoint(path: Path) -> Path:
    from mil_plugins.data import build_word_tokenizer
    from mil_plugins.engine.checkpoint import write_checkpoint

    stages = [{"name": "image"}, {"name": "video"}]
    state = {"completed": 1, "warmup_done": True, "in_stage": None, "step": 0,
             "stages": ["image", "video"], "modalities": ["image", "video"],
             "accuracy_matrix": [[50.0, None], [None, None]], "baseline": None, "per_task": {},
             "trainable_parameters": [10, None], "seconds": [1.0, None], "ever_trained": ["w"],
             "deepspeed_tag": None}
    tok = build_word_tokenizer(["what shape is it", "a circle"], special_tokens=["<image>"])
    write_checkpoint(path, weights={"w": torch.arange(6.0)}, methods={"ewc": {"f": torch.ones(2)}},
                     state=state, recipe={"stages": stages}, tokenizer=tok,
                     optimizer_state={"optimizer": {"state": {}, "param_groups": []}},
                     data={"manifests": {"image/train.json": "0" * 64}})
    return path


def _rewrite_checksums(ckpt: Path) -> None:
    from mil_plugins.checksums import write_checksums

    write_checksums(ckpt)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _tamper(ckpt: Path, name: str) -> str:
    """Damage the checkpoint; returns the file name the error must name."""
    if name == "weights-corrupt":
        (ckpt / "weights.safetensors").write_bytes(b"\x00" * 64)
        return "weights.safetensors"
    if name == "weights-truncated":
        data = (ckpt / "weights.safetensors").read_bytes()
        (ckpt / "weights.safetensors").write_bytes(data[: len(data) // 2])
        return "weights.safetensors"
    if name == "weights-truncated-resummed":  # checksums recomputed: the loader still names it
        data = (ckpt / "weights.safetensors").read_bytes()
        (ckpt / "weights.safetensors").write_bytes(data[: len(data) // 2])
        _rewrite_checksums(ckpt)
        return "weights.safetensors"
    if name == "optimizer-pickle":
        import pickle

        (ckpt / "optimizer.pt").write_bytes(pickle.dumps(_Evil()))
        _rewrite_checksums(ckpt)
        return "optimizer.pt"
    if name == "optimizer-torch-pickle":
        import io

        buf = io.BytesIO()
        torch.save({"x": _Evil()}, buf)
        (ckpt / "optimizer.pt").write_bytes(buf.getvalue())
        _rewrite_checksums(ckpt)
        return "optimizer.pt"
    if name == "state-not-utf8":
        (ckpt / "state.json").write_bytes(b'{"completed": "\xff"}')
        _rewrite_checksums(ckpt)
        return "state.json"
    if name == "state-edited":
        state = json.loads((ckpt / "state.json").read_text())
        state["completed"] = 2
        (ckpt / "state.json").write_text(json.dumps(state))
        return "state.json"
    for key, value in (("completed", 7), ("completed", -1), ("step", -3), ("in_stage", "audio"),
                       ("accuracy_matrix", [[1]])):
        if name == f"state-{key}-{value}":
            state = json.loads((ckpt / "state.json").read_text())
            state[key] = value
            (ckpt / "state.json").write_text(json.dumps(state))
            _rewrite_checksums(ckpt)
            return "state.json"
    if name == "recipe-edited":
        recipe = json.loads((ckpt / "recipe.json").read_text())
        recipe["stages"].reverse()
        (ckpt / "recipe.json").write_text(json.dumps(recipe))
        return "recipe.json"
    if name == "methods-json-invalid":
        (ckpt / "methods.json").write_text("{not json")
        _rewrite_checksums(ckpt)
        return "methods.json"
    if name == "tokenizer-edited":
        f = next(p for p in sorted((ckpt / "tokenizer").iterdir()) if p.is_file())
        f.write_text(f.read_text() + " ")
        return f.name
    if name == "file-added":
        (ckpt / "extra.bin").write_bytes(b"x")
        return "extra.bin"
    if name == "file-removed":
        (ckpt / "methods.safetensors").unlink()
        return "methods.safetensors"
    if name == "checksums-garbage":
        (ckpt / "checksums.json").write_text("[1, 2")
        return "checksums.json"
    raise KeyError(name)


CHECKPOINT_CASES = ["weights-corrupt", "weights-truncated", "weights-truncated-resummed",
                    "optimizer-pickle", "optimizer-torch-pickle", "state-not-utf8", "state-edited",
                    "state-completed-7", "state-completed--1", "state-step--3",
                    "state-in_stage-audio", "state-accuracy_matrix-[[1]]", "recipe-edited",
                    "methods-json-invalid", "tokenizer-edited", "file-added", "file-removed",
                    "checksums-garbage"]


def test_intact_checkpoint_reads(tmp_path):
    from mil_plugins.engine.checkpoint import read_checkpoint

    loaded = read_checkpoint(_checkpoint(tmp_path / "ck"))
    assert torch.equal(loaded["weights"]["w"], torch.arange(6.0))
    assert loaded["state"]["completed"] == 1 and loaded["data"]["manifests"]


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path, name, capsys):
    from mil_plugins.engine.checkpoint import CheckpointError, read_checkpoint

    ckpt = _checkpoint(tmp_path / "ck")
    culprit = _tamper(ckpt, name)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(ckpt)
    text = one_line(err.value)
    assert culprit in text, text
    assert "weights_only=False" not in text
    assert "this must never run" not in capsys.readouterr().out


# ---- plugins --------------------------------------------------------------------------------------

class _EP:
    def __init__(self, name, exc=None, obj=None):
        self.name, self.value, self._exc, self._obj = name, f"pkg_{name}:Plugin", exc, obj
        self.dist = None

    def load(self):
        if self._exc is not None:
            raise self._exc
        return self._obj


PLUGIN_CASES = {
    "system-exit": SystemExit(3),
    "system-exit-none": SystemExit(),
    "import-error": ImportError("No module named 'pkg_x'"),
    "runtime-error": RuntimeError("CUDA not available"),
    "recursion": RecursionError("maximum recursion depth exceeded"),
    "generator-exit": GeneratorExit(),
}


@pytest.mark.parametrize("name", PLUGIN_CASES)
def test_plugin_import_failures_are_failed_plugins(name):
    from mil_plugins.modality import check_modality_plugin
    from mil_plugins.registry import PluginError, Registry

    class Good:
        pass

    reg = Registry("modality", "test.group", check_modality_plugin)
    reg.discover([_EP("broken", exc=PLUGIN_CASES[name])])
    records = reg.records(load=True)
    assert [r.status for r in records] == ["failed"]
    with pytest.raises(PluginError) as err:
        reg.get("broken")
    assert "broken" in one_line(err.value) and "pkg_broken:Plugin" in str(err.value)


def test_mil_plugins_and_check_data_survive_a_plugin_calling_sys_exit(monkeypatch, tmp_path, capsys):
    from mil_plugins import cli
    from mil_plugins.plugins import MODALITIES

    monkeypatch.setattr(MODALITIES, "_records", dict(MODALITIES._records))
    MODALITIES.names()  # discovered before the fake one is added
    from mil_plugins.registry import PluginRecord

    def boom():
        raise SystemExit(3)

    MODALITIES._records["exiter"] = PluginRecord("modality", "exiter", "exiter-dist", "0.1",
                                                 "exiter:Plugin", _loader=boom)
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "exiter" in out and "failed" in out and "sys.exit(3)" in out
    root = tmp_path / "data"
    root.mkdir()
    _png(root / "img" / "a.png")
    (root / "m.json").write_text(json.dumps([{"id": "s", "image": "img/a.png",
                                              "conversations": _conv()}]))
    assert cli.main(["check-data", str(root / "m.json"), "--root", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "'exiter' is not available" in out and "1 samples, 0 bad" in out


# ---- run folders ----------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_is_refused(tmp_path):
    from mil_plugins.engine.rundir import RunFolder, RunFolderError

    (tmp_path / "out").write_text("x")
    with pytest.raises(RunFolderError) as err:
        RunFolder(tmp_path / "out").acquire()
    assert "is a file" in one_line(err.value)
    assert (tmp_path / "out").read_text() == "x"


def test_check_data_without_root_says_where_paths_were_resolved(tmp_path, capsys):
    from mil_plugins.data.check import run_check_data

    root = tmp_path / "data"
    _png(root / "image" / "files" / "a.png")
    (root / "image" / "train.json").write_text(json.dumps(
        [{"id": "s", "image": "image/files/a.png", "conversations": _conv()}]))
    assert run_check_data(root / "image" / "train.json", None, workers=1) == 1
    out = capsys.readouterr().out
    assert "media file missing" in out and "--root" in out and "check-data RECIPE" in out
    assert run_check_data(root / "image" / "train.json", root, workers=1) == 0
