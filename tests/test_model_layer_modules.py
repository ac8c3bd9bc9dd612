"""Method modules inside linear layers, routed by the token-modality map (model/layer_modules.py)."""

import copy

import pytest
import torch
from torch import nn

from _model_fixtures import (SeqPlugin, VecPlugin, greedy_recompute, make_batch, make_tokenizer,
                             registered_fakes, tiny_cfg)
from mil_plugins.model.build import build_model
from mil_plugins.model.layer_modules import find_linears

VEC, SEQ = VecPlugin.name, SeqPlugin.name


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


class PerModalityShift(nn.Module):
    """``y + x @ W[name]`` for each token, a different random W per modality (text included);
    records the routes it saw."""

    def __init__(self, names, d_in, d_out, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.ParameterDict({n: nn.Parameter(torch.randn(d_in, d_out, generator=g) * 0.3)
                                   for n in names})
        self.seen = []

    def forward(self, x, y, route):
        self.seen.append(route.ids.clone())
        for name, w in self.w.items():
            y = torch.where(route.mask(name).unsqueeze(-1), y + x @ w, y)
        return y


def _model(seed=0, lora=None):
    torch.manual_seed(seed)
    tok = make_tokenizer()
    return build_model(tiny_cfg(tok, "shared", lora=lora), tok)


def _prompts(m):
    g = torch.Generator().manual_seed(3)
    samples = [("<vec> what is it ?", None, {VEC: [torch.randn(6, generator=g)]}),
               ("<seq> say <vec> it", None, {SEQ: [torch.randn(3, 5, generator=g)],
                                             VEC: [torch.randn(6, generator=g)]}),
               ("hello what is it ? say", None, {})]
    return make_batch(m, samples, train=False)


def _wrap(m, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), seed=5):
    names = ["text", VEC, SEQ]
    return m.wrap_linears("test", list(targets),
                          lambda name, lin: PerModalityShift(names, lin.in_features,
                                                             lin.out_features, seed + len(name)))


def test_map_marks_placeholder_tokens_by_modality():
    m = _model()
    batch = _prompts(m)
    tmap = m.token_modality_map(batch["input_ids"])
    ids = batch["input_ids"]
    assert torch.equal(tmap == 1, ids == m.placeholder_ids[VEC])  # modalities in order: vec, seq
    assert torch.equal(tmap == 2, ids == m.placeholder_ids[SEQ])
    assert bool((tmap[2] == 0).all())  # the text-only prompt


def test_every_wrapped_layer_sees_the_map_of_the_forward():
    m = _model()
    modules = _wrap(m)
    assert len(modules) == 2 * 5  # two layers, five targets each
    assert all(name.startswith("model.layers.") for name in modules)
    batch = make_batch(m, [("<vec> what is it ?", "cat", {VEC: [torch.randn(6)]}),
                           ("<seq> say", "red", {SEQ: [torch.randn(3, 5)]})])
    m(batch)
    want = m.token_modality_map(batch["input_ids"])
    for module in modules.values():
        assert len(module.seen) == 1 and torch.equal(module.seen[0], want)
    names = [n for n, _ in m.named_parameters() if n.startswith("layer_modules.")]
    assert "layer_modules.llm-model-layers-0-self_attn-q_proj.modules_by_owner.test.w.text" in names
    # base weights keep their names
    assert "llm.model.layers.0.self_attn.q_proj.weight" in dict(m.named_parameters())


def test_cached_generation_equals_recomputation_with_the_map():
    m = _model()
    batch = _prompts(m)
    # a generated token is text: keep the untrained model from emitting a placeholder id
    placeholders = sorted(m.placeholder_ids.values())
    plain = m.generate_ids(batch, max_new_tokens=6, suppress_tokens=placeholders)
    modules = _wrap(m)
    cached = m.generate_ids(batch, max_new_tokens=6, suppress_tokens=placeholders)
    assert not torch.equal(cached, plain)  # the modules change what is generated
    # decoding steps (one new token per row) are text
    q = modules["model.layers.0.self_attn.q_proj"]
    steps = [ids for ids in q.seen if ids.shape[1] == 1]
    assert steps and all(bool((ids == 0).all()) for ids in steps)
    # full recomputation: the whole sequence through forward() at every step
    assert torch.equal(greedy_recompute(m, batch, cached.shape[1], placeholders), cached)


def test_teacher_copy_routes_through_its_own_modules():
    m = _model()
    modules = _wrap(m, targets=("v_proj",))
    batch = make_batch(m, [("<vec> what is it ?", "cat", {VEC: [torch.randn(6)]})])
    before = m(batch).logits.detach()
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for module in modules.values():
            module.w[VEC].add_(1.0)
    assert torch.equal(twin(batch).logits, before)
    assert not torch.equal(m(batch).logits, before)


def test_connector_scope_sees_the_projected_modality():
    m = _model()
    modules = m.wrap_linears("test", ["0", "2"], lambda n, lin: PerModalityShift(
        ["text", VEC, SEQ], lin.in_features, lin.out_features, 1), scope="connector")
    assert sorted(modules) == ["0", "2"]
    m.project(SEQ, torch.randn(2, 3, 5))
    ids = modules["0"].seen[-1]
    assert ids.shape == (2, 3) and bool((ids == 2).all())


def test_lora_wrapped_layers_are_found_by_their_own_name():
    m = _model(lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    found = [n for n, _ in find_linears(m.base_llm(), ["q_proj", "k_proj"])]
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    _wrap(m, targets=("q_proj",))
    batch = _prompts(m)
    assert m.generate_ids(batch, max_new_tokens=3).shape[0] == 3


def test_unknown_target_is_a_clear_error():
    m = _model()
    with pytest.raises(ValueError, match="no llm linear layer matches.*q_proj"):
        m.wrap_linears("test", ["qproj"], lambda n, lin: nn.Identity())


def test_hf_export_refuses_a_model_with_modules_inside_the_llm(tmp_path):
    from mil_plugins.export import export_hf

    m = _model()
    _wrap(m, targets=("q_proj",))
    with pytest.raises(ValueError, match="inside the LLM's layers"):
        export_hf(m, tmp_path / "hf")
