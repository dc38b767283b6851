"""A MoE block run phase by phase (detached boundaries, explicit backward per phase) equals the plain
module bitwise, in forward outputs and in every gradient (DESIGN.md principle 3)."""

from __future__ import annotations

import torch

from model import Transformer
from model.phases import Phase
from tests.conftest import small_config


def _block_and_input(seed: int = 0):
    torch.manual_seed(seed)
    cfg = small_config(n_layers=2, first_k_dense=1, seq_aux_alpha=0.01)
    model = Transformer(cfg)
    block = model.layers["1"]
    x = torch.randn(2, 12, cfg.dim)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    return block, x, cos, sin


def test_phases_equal_plain_forward_and_backward_bitwise():
    block, x, cos, sin = _block_and_input()
    gy = torch.randn_like(x)

    x_plain = x.clone().requires_grad_()
    y_plain = block(x_plain, cos, sin)
    y_plain.backward(gy)
    plain_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)

    x_ph = x.clone().requires_grad_()
    p1 = Phase(block.attn_router, x_ph, cos, sin)
    xa, h, idx, w = p1.detached_outputs()
    p2 = Phase(block.dispatch, h, idx, w)
    rows, ids, rw, layout = p2.detached_outputs()
    p3 = Phase(block.experts, rows, ids, rw, h)
    y, shared = p3.detached_outputs()
    p4 = Phase(block.combine, y, layout)
    (routed,) = p4.detached_outputs()
    p5 = Phase(block.residual, xa, shared, routed)
    assert torch.equal(p5.outputs[0], y_plain)

    g_xa, g_shared, g_routed = p5.backward([gy])
    (g_y, _) = p4.backward([g_routed])
    g_rows, _, g_rw, g_h_shared = p3.backward([g_y, g_shared])
    g_h_disp, _, g_w = p2.backward([g_rows, None, g_rw, None])
    g_x = p1.backward([g_xa, g_h_disp + g_h_shared, None, g_w])[0]

    assert torch.equal(g_x, x_plain.grad)
    for name, p in block.named_parameters():
        assert torch.equal(p.grad, plain_grads[name]), name


def test_phases_keep_gate_weight_gradient():
    block, x, cos, sin = _block_and_input(1)
    y = block(x.requires_grad_(), cos, sin)
    y.square().sum().backward()
    assert block.ffn.gate.weight.grad is not None and block.ffn.gate.weight.grad.abs().sum() > 0
