"""MultimodalDataset + Collator: padding, masks, media stacking order, the batch contract."""

from __future__ import annotations

import pytest
import torch
from fake_plugins import conv, plugins, snd, vec, write_json
from torch.utils.data import DataLoader

from mil_plugins.data import (BATCH_KEYS, IGNORE_INDEX, Collator, DataError, MultimodalDataset,
                              build_word_tokenizer, load_manifest, placeholder_tokens)

PLUGINS = plugins()


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(["what hear see compare same yes no a b c Q A :"], ["<vec>", "<snd>"])


@pytest.fixture
def data(tmp_path):
    recs = [
        {"id": "s1", "vec": [vec(tmp_path, "v1.npy", value=1), vec(tmp_path, "v2.npy", value=2)],
         "sound": snd(tmp_path, "a1.npy", n=3, value=10),
         "conversations": conv("<vec> <snd> <vec> compare", "same"), "task": "cmp", "metric": "exact"},
        {"id": "s2", "conversations": conv("what a b c", "yes")},
        {"id": "s3", "sound": snd(tmp_path, "a2.npy", n=5, value=20),
         "vec": vec(tmp_path, "v3.npy", value=3), "conversations": conv("hear <snd> see <vec>", "no")},
    ]
    return load_manifest(write_json(tmp_path / "m.json", recs), plugins=PLUGINS)


def dataset(data, tok, mode="train", **kw):
    ph = placeholder_tokens(tok, PLUGINS, {"vec": 2, "snd": 1})
    return MultimodalDataset(data, tok, "qa", PLUGINS, ph, max_length=64, mode=mode, **kw)


def test_items(data, tok):
    ds = dataset(data, tok)
    item = ds[0]
    assert item["id"] == "s1" and item["task"] == "cmp" and item["metric"] == "exact"
    assert [(m, k, float(t[0])) for m, k, t in item["media"]] == [
        ("vec", "input", 1.0), ("snd", "input", 10.0), ("vec", "input", 2.0)]
    assert item["modalities"] == ["vec", "snd", "vec"]
    assert item["labels"].shape == item["input_ids"].shape and "answer" not in item
    assert ds[1]["media"] == [] and ds[1]["modalities"] == []
    ev = dataset(data, tok, mode="eval")[2]
    assert ev["answer"] == "no" and "labels" not in ev


def test_right_padded_training_batch(data, tok):
    ds = dataset(data, tok)
    items = [ds[i] for i in range(3)]
    batch = Collator(tok.pad_token_id, PLUGINS)(items)
    assert tuple(batch) == BATCH_KEYS
    lengths = [len(it["input_ids"]) for it in items]
    B, L = batch["input_ids"].shape
    assert (B, L) == (3, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == items[i]["input_ids"].tolist()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
    # vec rows: sample-major, then placeholder order
    assert batch["media"]["vec"][:, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch["media"]["vec"].shape == (3, 4)
    # snd batched by the plugin's own collate (pads to the longest signal)
    assert batch["media"]["snd"].tolist() == [[10, 10, 10, 0, 0], [20] * 5]
    assert batch["media_kind"] == {"vec": "input", "snd": "input"}
    assert batch["modalities"] == [["vec", "snd", "vec"], [], ["snd", "vec"]]
    assert batch["ids"] == ["s1", "s2", "s3"] and batch["answers"] is None
    assert batch["tasks"] == ["cmp", None, None] and batch["metrics"] == ["exact", None, None]
    # the number of placeholder runs of each modality matches the rows of media
    vec_id = tok.convert_tokens_to_ids("<vec>")
    assert int((batch["input_ids"] == vec_id).sum()) == 2 * len(batch["media"]["vec"])


def test_left_padded_eval_batch(data, tok):
    ds = dataset(data, tok, mode="eval")
    items = [ds[i] for i in range(3)]
    batch = Collator(tok.pad_token_id, PLUGINS, padding_side="left")(items)
    assert tuple(batch) == BATCH_KEYS and batch["labels"] is None
    assert batch["answers"] == ["same", "yes", "no"]
    L = batch["input_ids"].shape[1]
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][i, L - n:].tolist() == it["input_ids"].tolist()
        assert batch["attention_mask"][i].tolist() == [0] * (L - n) + [1] * n
    assert (batch["input_ids"][:, -1] == batch["input_ids"][0, -1]).all()  # all end with "A :"


def test_text_only_batch_and_dataloader(data, tok):
    ds = dataset(data, tok)
    batch = Collator(tok.pad_token_id, PLUGINS)([ds[1]])
    assert batch["media"] == {} and batch["media_kind"] == {}
    loader = DataLoader(ds, batch_size=2, collate_fn=Collator(tok.pad_token_id, PLUGINS))
    assert [b["ids"] for b in loader] == [["s1", "s2"], ["s3"]]


def test_features_and_mixed_kinds(data, tok):
    def cached(modality, path):
        if modality == "vec":
            return "features", torch.full((2, 8), float(path.stem[-1]))
        return "input", PLUGINS[modality].preprocess(path)

    ds = dataset(data, tok, media_loader=cached)
    batch = Collator(tok.pad_token_id, PLUGINS)([ds[0], ds[2]])
    assert batch["media_kind"] == {"vec": "features", "snd": "input"}
    assert batch["media"]["vec"].shape == (3, 2, 8)
    assert batch["media"]["vec"][:, 0, 0].tolist() == [1.0, 2.0, 3.0]

    def half_cached(modality, path):
        if path.name == "v3.npy":
            return "features", torch.zeros(2, 8)
        return "input", PLUGINS[modality].preprocess(path)

    ds = dataset(data, tok, media_loader=half_cached)
    with pytest.raises(DataError, match=r"vec media of one batch must all be of one kind: sample "
                                        r"'s1' has 'input', sample 's3' has 'features'"):
        Collator(tok.pad_token_id, PLUGINS)([ds[0], ds[2]])


def test_mixed_train_and_eval_items(data, tok):
    train, ev = dataset(data, tok)[1], dataset(data, tok, mode="eval")[1]
    with pytest.raises(DataError, match="mixes training items"):
        Collator(tok.pad_token_id, PLUGINS)([train, ev])
    with pytest.raises(ValueError, match="no pad token"):
        Collator(None, PLUGINS)


def test_unreadable_file_is_a_data_error_naming_sample_and_file(data, tok, tmp_path):
    (tmp_path / "v3.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError) as err:
        dataset(data, tok)[2]
    msg = str(err.value)
    assert str(tmp_path / "m.json") in msg and "sample 's3'" in msg
    assert str((tmp_path / "v3.npy").resolve()) in msg and "not a .npy array" in msg
    assert err.value.file == str((tmp_path / "v3.npy").resolve())


def test_loader_contract_checked(data, tok):
    ds = dataset(data, tok, media_loader=lambda m, p: ("features", torch.zeros(2, 2, 2)))
    with pytest.raises(DataError, match=r"expected \[tokens, dim\]"):
        ds[0]
    ds = dataset(data, tok, media_loader=lambda m, p: ("raw", torch.zeros(2)))
    with pytest.raises(DataError, match="kind 'raw'"):
        ds[0]
