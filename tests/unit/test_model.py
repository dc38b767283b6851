"""Whole-model properties: MTP against the paper's truncated-sequence formulation, memory options that
leave gradients bitwise unchanged, deferred weight gradients, causality and per-document masking."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import Transformer
from model.linear import GroupedLinear, Linear, WeightGradStore
from model.transformer import IGNORE_INDEX
from tests.conftest import small_config


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(**overrides))


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mtp_loss_equals_truncated_sequences_reference():
    """Paper 2.2: depth k runs on the T-k positions that have t_{i+k+1}; we mask instead of truncating."""
    model = _model(n_mtp_depth=2)
    tokens = torch.randint(0, 101, (2, 17))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    lam = 0.3
    out = model.loss(inputs, labels, mtp_lambda=lam)

    T = inputs.shape[1]
    h = model.hidden(inputs)
    main = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), labels.flatten())
    mtp = []
    for k, module in enumerate(model.mtp, start=1):
        n = T - k
        cos, sin = model.rope_cos[:n], model.rope_sin[:n]
        h = module(h[:, :n], model.embed(labels[:, k - 1:k - 1 + n]), cos, sin)
        mtp.append(F.cross_entropy(model.head(module.norm(h)).flatten(0, 1), labels[:, k:k + n].flatten()))
    torch.testing.assert_close(out.main, main.detach())
    for got, want in zip(out.mtp, mtp):
        torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(out.loss, main + lam / 2 * sum(mtp))


def test_mtp_shares_embedding_and_head_and_can_be_dropped():
    model = _model()
    tokens = torch.randint(0, 101, (2, 9))
    out = model.loss(tokens, tokens, mtp_lambda=0.3)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad is not None
    names = [n for n, _ in model.named_parameters()]
    assert not any("mtp" in n and ("embed" in n or "head" in n) for n in names)  # no copies
    logits = model(tokens)
    model.drop_mtp()
    assert torch.equal(model(tokens), logits)
    assert torch.equal(model.loss(tokens, tokens, mtp_lambda=0.3).loss, out.main)


def test_ignored_labels_mask_main_and_mtp_targets():
    model = _model()
    tokens = torch.randint(0, 101, (1, 10))
    labels = tokens.clone()
    labels[0, 4] = IGNORE_INDEX
    out = model.loss(tokens, labels, mtp_lambda=1.0)
    assert torch.isfinite(out.loss)


def _loss_and_grads(model: Transformer, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model.loss(tokens, tokens.roll(-1, 1), mtp_lambda=0.3)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def test_recompute_options_leave_gradients_identical_and_save_memory():
    tokens = torch.randint(0, 101, (2, 16))
    base = _model(seed=3)
    saved = {}
    for flags in [dict(), dict(recompute_norm=True, recompute_mla_up_proj=True)]:
        torch.manual_seed(3)
        model = Transformer(small_config(**flags))
        model.load_state_dict(base.state_dict())
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.loss(tokens, tokens.roll(-1, 1), mtp_lambda=0.3).loss
        saved[bool(flags)] = sum(nbytes)
        loss.backward()
        if not flags:
            ref_loss, ref_grads = loss.detach(), _grads(model)
        else:
            assert torch.equal(loss.detach(), ref_loss)
            grads = _grads(model)
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                assert torch.equal(grads[name], ref_grads[name]), name
    assert saved[True] < saved[False]


def test_deferred_weight_gradients_equal_immediate():
    model = _model(seed=4)
    tokens = torch.randint(0, 101, (2, 12))
    loss, ref = _loss_and_grads(model, tokens)
    store = WeightGradStore()
    deferred = [m for m in model.modules() if isinstance(m, (Linear, GroupedLinear))]
    for m in deferred:
        m.wgrad_store = store
    model.zero_grad(set_to_none=True)
    model.loss(tokens, tokens.roll(-1, 1), mtp_lambda=0.3).loss.backward()
    assert len(store) > 0
    assert all(m.weight.grad is None for m in deferred)  # B ran, W not yet
    store.flush()
    got = _grads(model)
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_deferred_weight_gradients_of_bf16_weights_land_in_the_fp32_main_grad():
    """With bf16 weights and fp32 main gradients (model.grads.attach_main_grads), a deferred W must end where the
    immediate one does: in `main_grad`, in fp32, with `.grad` left empty."""
    from model.grads import attach_main_grads

    results = []
    for defer in (False, True):
        model = _model(seed=7).to(torch.bfloat16)
        attach_main_grads(model.parameters())
        store = WeightGradStore()
        if defer:
            for m in model.modules():
                if isinstance(m, (Linear, GroupedLinear)):
                    m.wgrad_store = store
        tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
        model.loss(tokens, tokens.roll(-1, 1), mtp_lambda=0.3).loss.backward()
        store.flush()
        assert all(p.grad is None for p in model.parameters())
        results.append({n: p.main_grad for n, p in model.named_parameters() if p.main_grad is not None})
    assert results[0].keys() == results[1].keys()
    for name, g in results[0].items():
        assert results[1][name].dtype == torch.float32
        torch.testing.assert_close(results[1][name], g, rtol=1e-2, atol=1e-5, msg=name)


def test_causal_future_tokens_do_not_change_the_past():
    model = _model(seed=5)
    a = torch.randint(0, 101, (1, 12))
    b = a.clone()
    b[0, 8:] = torch.randint(0, 101, (4,))
    torch.testing.assert_close(model(a)[:, :8], model(b)[:, :8], rtol=0, atol=1e-6)


def test_document_mask_isolates_packed_documents():
    model = _model(seed=6)
    doc_a, doc_b = torch.randint(0, 101, (1, 7)), torch.randint(0, 101, (1, 5))
    packed = torch.cat([doc_a, doc_b], 1)
    ids = torch.tensor([[0] * 7 + [1] * 5])
    masked = model(packed, document_ids=ids)
    torch.testing.assert_close(masked[:, :7], model(doc_a), rtol=0, atol=1e-5)
    # RoPE is relative, so doc_b alone (positions 0..4) equals doc_b at positions 7..11 behind the mask
    torch.testing.assert_close(masked[:, 7:], model(doc_b), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model(packed)[:, 7:], model(doc_b), atol=1e-4)  # default: no cross-doc mask


def test_fused_linear_cross_entropy_matches_float64_reference(monkeypatch):
    from model import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 3 * 50)  # several chunks of 3 rows
    torch.manual_seed(7)
    head = Linear(16, 50)
    h = torch.randn(4, 5, 16, requires_grad=True)
    labels = torch.randint(0, 50, (4, 5))
    labels[1, 2] = IGNORE_INDEX
    got = loss_mod.linear_cross_entropy(h, head, labels)
    got.mul(3.0).backward()
    h64 = h.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    ref.mul(3.0).backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(loss_mod.linear_cross_entropy(h, head, labels), got.detach())
