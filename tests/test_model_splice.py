import pytest
import torch

from mil_plugins.model.splice import PlaceholderMismatchError, splice_features

A, B, PAD = 90, 91, 0


def _embeds(ids, h=4):
    return torch.arange(ids.numel() * h, dtype=torch.float32).view(*ids.shape, h) * -1.0


def test_positions_sample_major_then_placeholder_order():
    # sample 0: two <A> occurrences (T=2 each), sample 1: one
    ids = torch.tensor([[5, A, A, 6, A, A, 7],
                        [A, A, 8, 9, PAD, PAD, PAD]])
    emb = _embeds(ids)
    feats = torch.stack([torch.full((2, 4), float(k + 1)) for k in range(3)])  # [N=3, T=2, H=4]
    out = splice_features(emb, ids, A, feats)
    assert torch.equal(out[0, 1], feats[0, 0]) and torch.equal(out[0, 2], feats[0, 1])
    assert torch.equal(out[0, 4], feats[1, 0]) and torch.equal(out[0, 5], feats[1, 1])
    assert torch.equal(out[1, 0], feats[2, 0]) and torch.equal(out[1, 1], feats[2, 1])
    keep = ids != A
    assert torch.equal(out[keep], emb[keep])
    assert torch.equal(emb, _embeds(ids))  # out of place


def test_several_modalities_per_sample():
    ids = torch.tensor([[A, A, B, B, B, 3], [B, B, B, 4, A, A]])
    emb = _embeds(ids)
    fa = torch.randn(2, 2, 4)
    fb = torch.randn(2, 3, 4)
    out = splice_features(splice_features(emb, ids, A, fa, "a"), ids, B, fb, "b")
    assert torch.equal(out[0, :2], fa[0]) and torch.equal(out[1, 4:6], fa[1])
    assert torch.equal(out[0, 2:5], fb[0]) and torch.equal(out[1, :3], fb[1])
    assert torch.equal(out[0, 5], emb[0, 5]) and torch.equal(out[1, 3], emb[1, 3])


def test_none_present():
    ids = torch.tensor([[1, 2, 3]])
    emb = _embeds(ids)
    assert splice_features(emb, ids, A, None) is emb
    assert torch.equal(splice_features(emb, ids, A, torch.zeros(0, 2, 4)), emb)


def test_gradient_flows_to_features():
    ids = torch.tensor([[A, A, 1]])
    feats = torch.randn(1, 2, 4, requires_grad=True)
    splice_features(_embeds(ids), ids, A, feats).sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))


def test_count_mismatch_truncated_placeholder():
    ids = torch.tensor([[1, A, A, A], [2, 3, 4, 5]])  # sample 0's second run cut to 1 copy
    with pytest.raises(PlaceholderMismatchError, match=r"3 placeholder positions.*2 inputs x 2 tokens"
                       r" = 4.*samples \[0\]"):
        splice_features(_embeds(ids), ids, A, torch.randn(2, 2, 4), modality="audio")
    with pytest.raises(ValueError, match="audio"):
        splice_features(_embeds(ids), ids, A, torch.randn(2, 2, 4), modality="audio")


def test_positions_without_features_and_bad_shapes():
    ids = torch.tensor([[A, A]])
    with pytest.raises(PlaceholderMismatchError, match="no features"):
        splice_features(_embeds(ids), ids, A, None)
    with pytest.raises(ValueError, match="width"):
        splice_features(_embeds(ids), ids, A, torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match=r"\[N, T, H\]"):
        splice_features(_embeds(ids), ids, A, torch.randn(2, 4))


def test_dtype_follows_embeddings():
    ids = torch.tensor([[A, 1]])
    out = splice_features(_embeds(ids).bfloat16(), ids, A, torch.randn(1, 1, 4))
    assert out.dtype == torch.bfloat16
