"""DeepSeekMoE router, routed experts and balancing against float64 references written independently."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from model.moe import (
    AttachLoss,
    Gate,
    RoutedExperts,
    expert_balance_loss,
    sequence_balance_loss,
    update_bias,
)
from tests.conftest import small_config


def reference_route(scores: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int, scale: float):
    """Per-token python reference of paper 2.1.2 with node-limited groups (float64)."""
    ids, weights = [], []
    per_group = scores.shape[1] // n_group
    for s in scores.double().tolist():
        biased = [v + b for v, b in zip(s, bias.double().tolist())]
        groups = [sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)[:2] for g in range(n_group)]
        group_scores = [sum(g) for g in groups]
        kept = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group] if n_group > 1 else [0]
        allowed = [e for e in range(len(s)) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
        total = sum(s[e] for e in chosen)
        ids.append(sorted(chosen))
        weights.append({e: s[e] / total * scale for e in chosen})
    return ids, weights


@pytest.mark.parametrize("n_group,topk_group", [(4, 2), (1, 1), (8, 3)])
def test_router_matches_reference(n_group, topk_group):
    torch.manual_seed(0)
    cfg = small_config(n_routed_experts=16, n_group=n_group, topk_group=topk_group, n_activated_experts=4)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.bias.uniform_(-0.3, 0.3)  # large enough to change choices: the bias must only choose
    x = torch.randn(64, cfg.dim)
    with torch.no_grad():
        scores, idx, w = gate(x)
    ref_scores = torch.sigmoid(x.double() @ gate.weight.double().t())
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-6, atol=1e-7)
    ref_ids, ref_w = reference_route(scores, gate.bias, 4, n_group, topk_group, cfg.routed_scaling_factor)
    for t in range(64):
        assert sorted(idx[t].tolist()) == ref_ids[t]
        for e, v in zip(idx[t].tolist(), w[t].tolist()):
            assert math.isclose(v, ref_w[t][e], rel_tol=1e-6)
    assert scores.dtype == w.dtype == torch.float32


def test_router_never_leaves_chosen_groups_and_drops_no_token():
    torch.manual_seed(1)
    cfg = small_config(n_routed_experts=16, n_group=4, topk_group=2, n_activated_experts=4)
    gate = Gate(cfg)
    gate.bias.uniform_(-5, 5)  # huge biases: -inf masking must still hold
    _, idx, w = gate(torch.randn(200, cfg.dim))
    groups_per_token = (idx // 4).unique(dim=None, sorted=False)
    assert groups_per_token.numel() <= 4
    assert all(len(set((row // 4).tolist())) <= 2 for row in idx)
    assert idx.shape == (200, 4)  # every token gets exactly K experts
    torch.testing.assert_close(w.sum(-1), torch.full((200,), cfg.routed_scaling_factor))


def reference_experts(experts: RoutedExperts, rows, ids, weights):
    out = torch.zeros(rows.shape, dtype=torch.float64)
    w1, w2, w3 = (m.weight.double() for m in (experts.w1, experts.w2, experts.w3))
    for r in range(rows.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[r, k])
            if e < 0:
                continue
            x = rows[r].double()
            h = torch.nn.functional.silu(w1[e] @ x) * (w3[e] @ x)
            out[r] += weights[r, k].double() * (w2[e] @ h)
    return out


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_routed_experts_match_per_token_reference(backend):
    torch.manual_seed(2)
    experts = RoutedExperts(6, 16, 8, backend)
    for m in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(m.weight, std=0.3)
    rows = torch.randn(20, 16, requires_grad=True)
    ids = torch.randint(0, 6, (20, 3))
    ids[::4, 1] = -1  # experts that live on another rank (DeepEP layout)
    weights = torch.rand(20, 3, requires_grad=True)
    out = experts(rows, ids, weights)
    ref_rows, ref_w = rows.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    ref = reference_experts(experts, ref_rows, ids, ref_w)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(rows.grad.double(), ref_rows.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-6)


def test_grouped_mm_and_loop_backends_agree_on_weight_gradients():
    torch.manual_seed(3)
    a, b = RoutedExperts(4, 16, 8, "grouped_mm"), RoutedExperts(4, 16, 8, "loop")
    b.load_state_dict(a.state_dict())
    for m in a.modules():
        if hasattr(m, "weight"):
            torch.nn.init.normal_(m.weight, std=0.3)
    b.load_state_dict(a.state_dict())
    rows, ids, w = torch.randn(32, 16), torch.randint(0, 4, (32, 2)), torch.rand(32, 2)
    a(rows, ids, w).sum().backward()
    b(rows, ids, w).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_counts_only_in_training_forward_and_once_under_recompute():
    cfg = small_config()
    gate = Gate(cfg)
    x = torch.randn(10, cfg.dim, requires_grad=True)
    with torch.no_grad():
        gate(x)
    assert gate.tokens_per_expert.sum() == 0
    gate(x)
    assert gate.tokens_per_expert.sum() == 10 * cfg.n_activated_experts
    for reentrant in (True, False):
        gate.tokens_per_expert.zero_()
        out = checkpoint(lambda t: gate(t)[2], x, use_reentrant=reentrant)
        out.sum().backward()
        assert gate.tokens_per_expert.sum() == 10 * cfg.n_activated_experts, reentrant


def test_update_bias_is_pure_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    new = update_bias(bias, load, 0.001)
    torch.testing.assert_close(new, torch.tensor([-0.001, 0.501, -0.499, 0.001]))
    assert torch.equal(bias, torch.tensor([0.0, 0.5, -0.5, 0.0]))  # input untouched


def test_sequence_balance_loss_matches_formula():
    torch.manual_seed(4)
    b, t, e, k, alpha = 3, 7, 8, 2, 0.01
    scores = torch.rand(b * t, e)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(b * t)])
    got = sequence_balance_loss(scores, idx, b, alpha)
    total = 0.0
    for s in range(b):
        rows = range(s * t, (s + 1) * t)
        f = [e / (k * t) * sum(1 for r in rows if i in idx[r].tolist()) for i in range(e)]
        p = [sum(float(scores[r, i] / scores[r].sum()) for r in rows) / t for i in range(e)]
        total += alpha * sum(fi * pi for fi, pi in zip(f, p))
    assert math.isclose(got.item(), total / b, rel_tol=1e-5)


def test_expert_balance_loss_matches_formula():
    torch.manual_seed(5)
    n, e, k, alpha = 30, 6, 2, 0.1
    scores = torch.rand(n, e)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    f = [e / (k * n) * int((idx == i).sum()) for i in range(e)]
    p = (scores / scores.sum(-1, keepdim=True)).mean(0).tolist()
    assert math.isclose(expert_balance_loss(scores, idx, alpha).item(), alpha * sum(a * b for a, b in zip(f, p)),
                        rel_tol=1e-5)


def test_attach_loss_adds_the_loss_gradient_without_changing_the_value():
    torch.manual_seed(6)
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5, requires_grad=True)
    aux = (w ** 2).sum()
    y = AttachLoss.apply(x * 2, aux, 0.5)
    assert torch.equal(y, x * 2)
    y.sum().backward()
    torch.testing.assert_close(w.grad, 0.5 * 2 * w.detach())  # d(0.5 * aux)/dw
    torch.testing.assert_close(x.grad, torch.full((5,), 2.0))


@pytest.mark.parametrize("balance", ["aux_free", "aux_loss", "batch_aux", "none"])
def test_balance_switch_selects_the_loss(balance):
    from model.moe import MoE

    torch.manual_seed(7)
    cfg = small_config(balance=balance, seq_aux_alpha=0.5, aux_loss_alpha=0.25)
    moe = MoE(cfg)
    h = torch.randn(2, 6, cfg.dim, requires_grad=True)
    out, idx, _ = moe.route(h)
    scores = moe.gate(h.detach().flatten(0, 1))[0]
    expected = {"aux_free": sequence_balance_loss(scores, idx, 2, 0.5),
                "aux_loss": sequence_balance_loss(scores, idx, 2, 0.25),  # per sequence, its own weight
                "batch_aux": expert_balance_loss(scores, idx, 0.25), "none": None}[balance]
    if expected is None:
        assert out is h and moe.last_aux_loss is None
    else:
        torch.testing.assert_close(moe.last_aux_loss, expected.detach())
        out.sum().backward()
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
