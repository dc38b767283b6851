"""Name-keyed initialisation (model/init.py): a part of the model built on the meta device and materialised on
its own holds bitwise the tensors of the whole model built in one process with the same seed, for pipeline
cuts, blocks of routed experts and both at once; and the rules cover every parameter and buffer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import Transformer
from model.init import init_parameters, materialize, param_seed
from model.linear import GroupedLinear
from model.presets import load

SEED = 1234


def _whole() -> Transformer:
    torch.manual_seed(SEED)
    return Transformer(load("tiny"))


def _part(layers: set[int], experts: tuple[int, int] | None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(load("tiny"))
    model.layers = nn.ModuleDict({k: v for k, v in model.layers.items() if int(k) in layers})
    if experts is not None:
        start, end = experts
        for m in model.modules():
            if isinstance(m, GroupedLinear):
                m.weight = nn.Parameter(m.weight.detach()[start:end].clone())
                m.n_experts, m.first_expert = end - start, start
    return materialize(model, "cpu", SEED, model.cfg.init_std)


@pytest.mark.parametrize("layers,experts", [({0, 1, 2, 3}, None), ({2, 3}, None), ({0, 3}, (4, 8)),
                                            ({1}, (12, 16)), ({0, 1, 2, 3}, (0, 16))])
def test_a_part_materialised_alone_equals_the_whole_model(layers, experts):
    whole = dict(_whole().named_parameters())
    buffers = dict(_whole().named_buffers())
    part = _part(layers, experts)
    assert all(not p.is_meta for p in part.parameters())
    for name, p in part.named_parameters():
        ref = whole[name]
        if p.shape != ref.shape:  # a block of experts
            ref = ref[experts[0]:experts[1]]
        assert torch.equal(p, ref), name
    for name, b in part.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_the_seed_and_the_name_decide_each_tensor():
    a, b = _whole(), _whole()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    init_parameters(b, SEED + 1, b.cfg.init_std)
    assert not torch.equal(a.head.weight, b.head.weight)
    # two tensors of the same shape get different values, and so do two experts of one GroupedLinear
    assert not torch.equal(a.layers["1"].attn.wkv_a.weight, a.layers["2"].attn.wkv_a.weight)
    w1 = a.layers["1"].ffn.experts.w1.weight
    assert not torch.equal(w1[0], w1[1])
    assert param_seed(0, "x") != param_seed(0, "x", 0) != param_seed(0, "x", 1)
    std = a.head.weight.std().item()
    assert abs(std - a.cfg.init_std) < 0.05 * a.cfg.init_std


def test_a_parameter_without_a_rule_is_refused():
    model = _whole()
    model.extra = nn.Module()
    model.extra.register_parameter("scale", nn.Parameter(torch.ones(3)))
    with pytest.raises(TypeError, match="extra.scale"):
        init_parameters(model, SEED, 0.02)
