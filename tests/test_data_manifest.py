"""Manifest reading and validation: every bad-data case is a DataError naming manifest, sample, problem."""

from __future__ import annotations

import json

import pytest
from fake_plugins import conv, fake_modalities, plugins, snd, vec, write_json, write_jsonl  # noqa: F401

from mil_plugins.data import DataError, load_manifest, load_manifests


@pytest.fixture
def root(tmp_path):
    vec(tmp_path, "v/a.npy")
    vec(tmp_path, "v/b.npy")
    snd(tmp_path, "s/a.npy")
    return tmp_path


def good(sid="ok", **extra):
    rec = {"id": sid, "vec": "v/a.npy", "conversations": conv("<vec>\nwhat is it?", "a vector")}
    rec.update(extra)
    return rec


def test_good_sample(root):
    rec = {"id": "s1", "vec": ["v/a.npy", "v/b.npy"], "sound": "s/a.npy", "task": "t",
           "metric": "exact", "meta": {"k": 1}, "source": "x",
           "conversations": [{"from": "system", "value": "be brief"},
                             {"from": "user", "value": "<vec> <snd> <vec> compare"},
                             {"from": "assistant", "value": "same"}]}
    data = load_manifest(write_json(root / "m.json", [rec]), plugins=plugins())
    (s,) = data.samples
    assert not data.skipped
    assert s.id == "s1" and s.task == "t" and s.metric == "exact" and s.index == 0
    assert s.manifest == root / "m.json" and s.meta == {"k": 1} and s.options is None
    assert [t["from"] for t in s.conversations] == ["system", "human", "gpt"]
    assert s.media["vec"] == [(root / "v/a.npy").resolve(), (root / "v/b.npy").resolve()]
    assert all(p.is_absolute() for p in s.media["vec"])
    order = s.media_in_order(plugins())
    assert [(m, p.name, p.parent.name) for m, p in order] == [
        ("vec", "a.npy", "v"), ("snd", "a.npy", "s"), ("vec", "b.npy", "v")]


def test_a_questions_options_are_kept(root):
    data = load_manifest(write_json(root / "m.json", [good(options=["a vector", "a sound"])]),
                         plugins=plugins())
    assert data.samples[0].options == ("a vector", "a sound")


def test_text_only_and_absolute_path_inside_root(root):
    recs = [{"id": "t", "conversations": conv("hello", "hi")},
            good("abs", vec=str(root / "v/a.npy"))]
    data = load_manifest(write_json(root / "m.json", recs), plugins=plugins())
    assert [s.id for s in data.samples] == ["t", "abs"]
    assert data.samples[0].media == {} and data.samples[0].modalities == []


def test_jsonl_by_suffix_and_by_content(root):
    recs = [good("a"), good("b")]
    assert len(load_manifest(write_jsonl(root / "m.jsonl", recs), plugins=plugins())) == 2
    assert len(load_manifest(write_jsonl(root / "lines.json", recs), plugins=plugins())) == 2


def test_root_defaults_to_manifest_dir_and_can_be_given(root):
    sub = root / "ann"
    sub.mkdir()
    path = write_json(sub / "m.json", [good()])
    with pytest.raises(DataError, match="media file missing"):
        load_manifest(path, plugins=plugins())
    assert len(load_manifest(path, root, plugins())) == 1


# -- file-level errors: always raised ----------------------------------------------------------------
def test_invalid_json_names_line_and_column(root):
    path = root / "m.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    for mode in ("raise", "skip"):
        with pytest.raises(DataError) as err:
            load_manifest(path, plugins=plugins(), on_error=mode)
        msg = str(err.value)
        assert str(path) in msg and "invalid JSON at line 3, column" in msg


def test_not_utf8_names_byte_offset(root):
    path = root / "m.json"
    path.write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(DataError) as err:
        load_manifest(path, plugins=plugins(), on_error="skip")
    assert str(path) in str(err.value) and "byte offset 12" in str(err.value)
    assert "0xe9" in str(err.value)


def test_top_level_object_is_an_error(root):
    with pytest.raises(DataError, match="expected a list of samples"):
        load_manifest(write_json(root / "m.json", {"data": []}), plugins=plugins())


# -- sample-level errors ------------------------------------------------------------------------------
BAD = {
    "missing id": ({"conversations": conv("q", "a")}, "missing 'id'"),
    "missing conversations": ({"id": "X"}, "missing 'conversations'"),
    "empty conversations": ({"id": "X", "conversations": []}, "empty 'conversations'"),
    "bad role": ({"id": "X", "conversations": [{"from": "bot", "value": "q"},
                                               {"from": "gpt", "value": "a"}]},
                 "'from' is 'bot'"),
    "non-string value": ({"id": "X", "conversations": [{"from": "human", "value": ["q"]},
                                                       {"from": "gpt", "value": "a"}]},
                         "'value' must be a string"),
    "not alternating": ({"id": "X", "conversations": [{"from": "human", "value": "q"},
                                                      {"from": "human", "value": "a"}]},
                        "expected a gpt turn"),
    "ends with human": ({"id": "X", "conversations": conv("q", "a") + [
        {"from": "human", "value": "more?"}]}, "must end with the gpt answer"),
    "empty final answer": ({"id": "X", "conversations": conv("q", "  ")}, "empty final answer"),
    "unknown plain key": ({"id": "X", "colour": "red", "conversations": conv("q", "a")},
                          "unknown key 'colour' (known modality keys: sound, vec)"),
    "uninstalled modality": ({"id": "X", "lidar": "a.bin", "conversations": conv("<lidar>", "a")},
                             "looks like a modality, but no modality plugin for 'lidar' is installed"),
    "media missing": (good("X", vec="v/nope.npy"), "media file missing"),
    "escape with ..": (good("X", vec="../outside.npy"), "escapes the data root"),
    "escape absolute": (good("X", vec="/etc/passwd"), "absolute path '/etc/passwd' escapes"),
    "count mismatch": (good("X", vec=["v/a.npy", "v/b.npy"]),
                       "1 '<vec>' placeholder(s) in the human turns but 2 file(s) under 'vec'"),
    "placeholder without file": ({"id": "X", "conversations": conv("<snd> hear", "a")},
                                 "1 '<snd>' placeholder(s) in the human turns but 0 file(s) "
                                 "under 'sound'"),
    "placeholder in gpt turn": ({"id": "X", "conversations": conv("q", "it is <vec>")},
                                "turn 1 (gpt) contains the placeholder '<vec>'"),
    "bad media value": (good("X", vec={"a": 1}), "must be a path or a list of paths"),
    "task not a string": (good("X", task=3), "'task' must be a string"),
    "options not a list": (good("X", options="red or blue"), "'options' must be a non-empty list"),
    "an empty option": (good("X", options=["red", " "]), "'options' must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sample_raises_naming_manifest_sample_and_problem(root, case):
    rec, problem = BAD[case]
    path = write_json(root / "m.json", [good("first"), rec])
    with pytest.raises(DataError) as err:
        load_manifest(path, plugins=plugins())
    msg = str(err.value)
    assert str(path) in msg
    assert ("sample 'X'" in msg) if "id" in rec else ("index 1" in msg)
    assert problem in msg, msg
    assert isinstance(err.value, ValueError) and err.value.index == 1


def test_duplicate_id(root):
    path = write_json(root / "m.json", [good("d"), good("e"), good("d")])
    with pytest.raises(DataError, match=r"sample 'd' \(index 2\): duplicate id .*index 0"):
        load_manifest(path, plugins=plugins())


def test_installed_but_not_enabled_plugin_is_named(root, fake_modalities):
    rec = {"id": "X", "sound": "s/a.npy", "conversations": conv("<snd> hi", "a")}
    only_vec = {"vec": fake_modalities["vec"]}
    with pytest.raises(DataError, match="unknown key 'sound'.*looks like a modality"):
        load_manifest(write_json(root / "m.json", [rec]), plugins=only_vec)
    rec = {"id": "X", "snd": "s/a.npy", "conversations": conv("hi", "a")}
    with pytest.raises(DataError, match="installed modality plugin 'snd', which is not enabled"):
        load_manifest(write_json(root / "m.json", [rec]), plugins=only_vec)


def test_several_problems_of_one_sample_are_all_reported(root):
    rec = {"id": "X", "colour": 1, "vec": "v/missing.npy", "conversations": conv("<vec>", "")}
    with pytest.raises(DataError) as err:
        load_manifest(write_json(root / "m.json", [rec]), plugins=plugins())
    msg = str(err.value)
    assert "unknown key 'colour'" in msg and "media file missing" in msg and "empty final" in msg


# -- skip mode ----------------------------------------------------------------------------------------
def test_skip_mode_records_every_bad_sample(root):
    recs = [good("g1")] + [rec for rec, _ in BAD.values()] + [good("g2"), good("g1")]
    data = load_manifest(write_json(root / "m.json", recs), plugins=plugins(), on_error="skip")
    assert [s.id for s in data.samples] == ["g1", "g2"]
    assert len(data.skipped) == len(BAD) + 1
    assert data.skipped[-1].id == "g1" and "duplicate id" in data.skipped[-1].reason
    assert [s.index for s in data.skipped] == list(range(1, len(BAD) + 1)) + [len(recs) - 1]
    for skipped, (_, problem) in zip(data.skipped, BAD.values()):
        assert problem in skipped.reason
        assert str(root / "m.json") in str(skipped)
    missing = next(s for s in data.skipped if "media file missing" in s.reason)
    assert missing.file == str((root / "v/nope.npy").resolve())


def test_skip_mode_jsonl_bad_line(root):
    path = root / "m.jsonl"
    path.write_text(json.dumps(good("a")) + "\n{oops\n\n" + json.dumps(good("b")) + "\n")
    with pytest.raises(DataError, match="invalid JSON at line 2, column 2"):
        load_manifest(path, plugins=plugins())
    data = load_manifest(path, plugins=plugins(), on_error="skip")
    assert [s.id for s in data.samples] == ["a", "b"]
    assert data.skipped[0].index == 1 and data.skipped[0].id is None


def test_load_manifests_concatenates_and_checks_ids(root):
    a = write_json(root / "a.json", [good("1"), good("2")])
    b = write_jsonl(root / "b.jsonl", [good("3")])
    data = load_manifests([a, b], plugins=plugins())
    assert [s.id for s in data.samples] == ["1", "2", "3"] and data.paths == [a, b]
    c = write_json(root / "c.json", [good("2")])
    with pytest.raises(DataError, match=r"c\.json: sample '2'.*also used in .*a\.json"):
        load_manifests([a, c], plugins=plugins())
    assert len(load_manifests([a, c], plugins=plugins(), on_error="skip").skipped) == 1


def test_bad_on_error_value(root):
    with pytest.raises(ValueError, match="on_error"):
        load_manifest(write_json(root / "m.json", []), plugins=plugins(), on_error="ignore")
