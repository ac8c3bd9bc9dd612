import pytest
import torch
from torch import nn

from mil_plugins.model.connector import Connector


def test_per_modality_names_and_shapes():
    c = Connector(16, "per_modality", "mlp2x_gelu")
    c.add_modality("audio", 8)
    c.add_modality("point", 6, "linear")
    names = [n for n, _ in c.named_parameters()]
    assert names == ["projectors.audio.0.weight", "projectors.audio.0.bias",
                     "projectors.audio.2.weight", "projectors.audio.2.bias",
                     "projectors.point.weight", "projectors.point.bias"]
    assert c.shared is None and len(c.input_layers) == 0
    assert c("audio", torch.randn(3, 5, 8)).shape == (3, 5, 16)
    assert c("point", torch.randn(2, 7, 6)).shape == (2, 7, 16)
    assert c.modalities == ["audio", "point"]
    with pytest.raises(ValueError, match="width"):
        c("audio", torch.randn(1, 2, 6))
    with pytest.raises(KeyError, match="video"):
        c("video", torch.randn(1, 2, 6))
    with pytest.raises(ValueError, match="already"):
        c.add_modality("audio", 8)


def test_per_modality_isolation():
    c = Connector(16, "per_modality")
    c.add_modality("a", 8)
    c.add_modality("b", 8)
    c("a", torch.randn(2, 3, 8)).sum().backward()
    assert all(p.grad is not None for p in c.projectors["a"].parameters())
    assert all(p.grad is None for p in c.projectors["b"].parameters())


def test_shared_names_and_sharing():
    c = Connector(16, "shared", "mlp2x_gelu", shared_dim=12)
    c.add_modality("audio", 8)
    c.add_modality("depth", 5)
    names = [n for n, _ in c.named_parameters()]
    assert names == ["input_layers.audio.weight", "input_layers.audio.bias",
                     "input_layers.depth.weight", "input_layers.depth.bias",
                     "shared.0.weight", "shared.0.bias", "shared.2.weight", "shared.2.bias"]
    assert c.input_layers["depth"].weight.shape == (12, 5)
    assert c("depth", torch.randn(2, 4, 5)).shape == (2, 4, 16)
    c("audio", torch.randn(2, 4, 8)).sum().backward()
    assert c.shared[0].weight.grad is not None and c.input_layers["depth"].weight.grad is None
    assert c.parameters_for("audio")[-1] is c.shared[2].bias


def test_shared_defaults_and_bad_mode():
    c = Connector(16, "shared")
    assert c.projector_type == "mlp2x_gelu" and c.shared_dim == 16
    with pytest.raises(ValueError, match="mode"):
        Connector(16, "both")


def test_add_modality_later_follows_dtype():
    c = Connector(16, "shared", "linear", shared_dim=8).to(torch.bfloat16)
    c.add_modality("video", 4)
    assert c.input_layers["video"].weight.dtype == torch.bfloat16
    out = c("video", torch.randn(1, 2, 4))  # float32 input is cast
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 16)


def test_wrapped_shared_projector_is_used():
    c = Connector(16, "shared", "linear")
    c.add_modality("a", 4)

    class Gate(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.scale = inner, nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.inner(x) * self.scale

    c.shared = Gate(c.shared)
    assert torch.equal(c("a", torch.randn(1, 2, 4)), torch.zeros(1, 2, 16))
    assert "shared.inner.weight" in dict(c.named_parameters())


def test_config_roundtrip_and_dummy():
    c = Connector(16, "shared", "mlp2x_gelu", shared_dim=12)
    c.add_modality("a", 8)
    c2 = Connector.from_config(c.config())
    c2.load_state_dict(c.state_dict())
    x = torch.randn(2, 3, 8)
    assert torch.equal(c("a", x), c2("a", x))
    d = c.dummy_output("a")
    assert d.item() == 0.0 and d.requires_grad
    d.backward()
    assert all(p.grad is not None for p in c.parameters())


def test_llava_projector_state():
    c = Connector(16, "per_modality")
    c.add_modality("a", 8, "mlp2x_gelu")
    ptype, mm, sd = c.llava_projector_state("a")
    assert (ptype, mm, sorted(sd)) == ("mlp2x_gelu", 8, ["0.bias", "0.weight", "2.bias", "2.weight"])

    s = Connector(16, "shared", "mlp2x_gelu", shared_dim=12)
    s.add_modality("a", 8)
    ptype, mm, sd = s.llava_projector_state("a")
    assert (ptype, mm) == ("mlp2x_gelu", 12) and sd["0.weight"].shape == (16, 12)
    assert set(s.input_layer_state("a")) == {"weight", "bias"}
    # folding the input layer gives a stand-alone LLaVA projector with the same outputs
    ptype, mm, sd = s.llava_projector_state("a", fold_input_layer=True)
    assert (ptype, mm) == ("mlp2x_gelu", 8)
    from mil_plugins.projectors import build_projector
    p = build_projector(ptype, mm, 16)
    p.load_state_dict(sd)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(p(x), s("a", x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        c.input_layer_state("a")


# ---- feature standardiser and token mixer --------------------------------------------------------

def _features(n=64, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 10.0 + 0.01 * torch.randn(n, t, d, generator=g)  # a big shared offset, small variation


@pytest.mark.parametrize("mode", ["per_modality", "shared"])
def test_standardizer_is_identity_until_fitted_then_standardises(mode):
    c = Connector(16, mode, "mlp2x_gelu", standardize=True)
    c.add_modality("audio", 8, num_tokens=5)
    x = _features()
    before = c("audio", x)
    assert c.needs_fit("audio")
    std = c.standardizers["audio"]
    assert torch.equal(std(x), x)
    c.fit_standardizer("audio", x)
    assert not c.needs_fit("audio")
    z = std(x).reshape(-1, 8)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(8), atol=1e-3)
    assert not torch.allclose(c("audio", x), before)


@pytest.mark.parametrize("mode", ["per_modality", "shared"])
def test_fitted_standardizer_folds_into_the_llava_projector_exactly(mode):
    from mil_plugins.projectors import build_projector

    c = Connector(16, mode, "mlp2x_gelu", standardize=True)
    c.add_modality("audio", 8)
    x = _features()
    c.fit_standardizer("audio", x)
    ptype, hidden, sd = c.llava_projector_state("audio", fold_input_layer=True)
    proj = build_projector(ptype, hidden, 16)
    proj.load_state_dict(sd)
    with torch.no_grad():
        assert torch.allclose(proj(x), c("audio", x), atol=1e-4)


def test_token_mixer_reads_all_tokens_and_writes_k():
    c = Connector(16, "shared", "mlp2x_gelu", shared_dim=12, standardize=True, mix_tokens=3)
    c.add_modality("video", 8, num_tokens=5)
    assert c.output_tokens("video", 5) == 3
    x = _features(t=5)
    c.fit_standardizer("video", x)
    assert c.standardizers["video"].mean.shape == (5, 8)  # per (token, dimension)
    assert c("video", x).shape == (64, 3, 16)
    y = x.clone()
    y[:, 4] += 1.0  # only the last token changes: every output token can see it
    assert not torch.allclose(c("video", y)[:, 0], c("video", x)[:, 0])
    # the mixer as one linear map of the flattened raw features, then the LLaVA projector
    mixer = c.mixer_state("video")
    with torch.no_grad():
        mixed = torch.nn.functional.linear(x.reshape(64, -1), mixer["weight"], mixer["bias"])
        assert torch.allclose(c.shared(mixed.view(64, 3, 12)), c("video", x), atol=1e-4)
    assert c.dummy_output("video").item() == 0.0
    with pytest.raises(ValueError, match="mix_tokens"):
        c.llava_projector_state("video", fold_input_layer=True)
    rebuilt = Connector.from_config(c.config())
    rebuilt.load_state_dict(c.state_dict())
    assert torch.equal(rebuilt("video", x), c("video", x))


def test_token_mixer_needs_the_shared_mode():
    with pytest.raises(ValueError, match="shared"):
        Connector(16, "per_modality", mix_tokens=2)


def test_mix_tokens_by_modality_keeps_chosen_modalities_per_token():
    from mil_plugins.projectors import build_projector

    c = Connector(16, "shared", "mlp2x_gelu", shared_dim=12, standardize=True, mix_tokens=3,
                  mix_tokens_by_modality={"image": None, "audio": 2})
    c.add_modality("image", 8, num_tokens=5)
    c.add_modality("video", 8, num_tokens=5)
    c.add_modality("audio", 8, num_tokens=5)
    assert [c.mix_tokens_of(m) for m in ("image", "video", "audio")] == [None, 3, 2]
    assert isinstance(c.input_layers["image"], torch.nn.Linear)
    assert [c.output_tokens(m, 5) for m in ("image", "video", "audio")] == [5, 3, 2]
    x = _features(t=5)
    for m in ("image", "video", "audio"):
        c.fit_standardizer(m, x)
    assert c.standardizers["image"].mean.shape == (8,) and c.standardizers["video"].mean.shape == (5, 8)
    assert c("image", x).shape == (64, 5, 16) and c("audio", x).shape == (64, 2, 16)
    # the per-token image path folds into one LLaVA projector; the mixed ones do not
    ptype, mm_hidden, state = c.llava_projector_state("image", fold_input_layer=True)
    proj = build_projector(ptype, mm_hidden, 16)
    proj.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(proj(x), c("image", x), atol=1e-4)
    with pytest.raises(ValueError, match="mix_tokens_by_modality"):
        c.llava_projector_state("video", fold_input_layer=True)
    rebuilt = Connector.from_config(c.config())
    rebuilt.load_state_dict(c.state_dict())
    assert torch.equal(rebuilt("image", x), c("image", x)) and rebuilt.mix_tokens_of("audio") == 2
    with pytest.raises(ValueError, match="shared"):
        Connector(16, "per_modality", mix_tokens_by_modality={"audio": 2})
