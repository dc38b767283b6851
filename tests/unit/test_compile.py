"""trainer.compile (trainer/compile.py): with the dense modules compiled, training equals eager within fp32 tolerance
(losses, every gradient, the weights after two AdamW steps); the MoE routing, routed experts and every Linear stay
eager, so weight gradients can still be deferred to a pipeline's W, and FP8 and the recompute options keep working.

Dynamo with the aot_eager backend (the graphs dynamo and AOTAutograd capture, run without code generation) keeps
these tests to seconds (about 9 s together); the inductor test, the backend trainer.compile uses, compiles C++
kernels (35-60 s on 2 shared cores with an empty cache) and is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fp8.config import FP8Config
from fp8.recipe import apply_fp8
from model import Transformer
from model.grads import grad_of
from model.linear import GroupedLinear, Linear, WeightGradStore
from model.moe import MoE
from optim.adamw import AdamW
from optim.config import OptimConfig
from tests.conftest import small_config
from trainer.compile import compile_dense, compile_stats, compiled_modules, dense_modules


@pytest.fixture(autouse=True)
def _one_thread():
    """At these shapes a second thread only adds waits: each OpenMP region waits for a core, which on a shared
    2-core machine another job may hold (the tiny grouped expert GEMMs then take 0.1 s a call instead of 20 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 1 dense + 1 MoE block (MLA in both), MTP depth 1 (an MoE block of its own)
DENSE = ["layers.0.attn_norm", "layers.0.attn", "layers.0.ffn_norm", "layers.0.ffn",
         "layers.1.attn_norm", "layers.1.attn", "layers.1.ffn_norm", "layers.1.ffn.shared_experts", "norm",
         "mtp.0.enorm", "mtp.0.hnorm", "mtp.0.block.attn_norm", "mtp.0.block.attn", "mtp.0.block.ffn_norm",
         "mtp.0.block.ffn.shared_experts", "mtp.0.norm"]


def _pair(fp8: bool = False, **flags) -> tuple[Transformer, Transformer]:
    """Two models with the same weights: eager, and compiled with aot_eager."""
    cfg = small_config(n_layers=2, **flags)
    torch.manual_seed(0)
    eager, compiled = Transformer(cfg), Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    if fp8:
        for m in (eager, compiled):
            apply_fp8(m, FP8Config(recipe="emulate"))
    compile_dense(compiled, backend="aot_eager")
    return eager, compiled


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(t, t.roll(-1, 1)) for t in (torch.randint(0, 101, (2, 16), generator=g) for _ in range(steps))]


def _train_alike(eager: Transformer, compiled: Transformer, steps: int = 2) -> None:
    """`steps` AdamW steps of both models on the same batches: losses, gradients and weights equal within fp32
    tolerance (assert_close's default)."""
    opts = [AdamW(m.named_parameters(), OptimConfig(moment_dtype="fp32")) for m in (eager, compiled)]
    for tokens, labels in _batches(steps):
        losses, grads = [], []
        for model, opt in zip((eager, compiled), opts):
            loss = model.loss(tokens, labels, mtp_lambda=0.3).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: grad_of(p).clone() for n, p in model.named_parameters() if grad_of(p) is not None})
            opt.step(1e-3, 1.0)
            opt.zero_grad()
        assert_close(losses[1], losses[0])
        assert grads[1].keys() == grads[0].keys()
        for name, g in grads[0].items():
            assert_close(grads[1][name], g, msg=name)
    weights = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert_close(p, weights[name], msg=name)


def test_compiled_training_equals_eager_and_moe_stays_eager():
    eager, compiled = _pair()
    assert compiled_modules(compiled) == DENSE and compiled_modules(eager) == []
    assert [name for name, _ in dense_modules(compiled)] == DENSE
    assert compile_dense(compiled) == 0  # already compiled: nothing twice
    _train_alike(eager, compiled, steps=1)
    settled = compile_stats()
    assert settled["graph_breaks"] > 0  # at the eager Linears
    _train_alike(eager, compiled, steps=2)  # two more steps (new weights, the same shapes): no recompile
    assert compile_stats()["frames"] == settled["frames"]
    names = compiled_modules(compiled)
    for name, m in compiled.named_modules():
        if name.endswith(("ffn.gate", "ffn.experts")) or name in ("embed", "head", "mtp.0.eh_proj"):
            assert name not in names, name
        if isinstance(m, (Linear, GroupedLinear)):  # eager, inside a compiled module a graph break
            inside = any(name.startswith(c + ".") for c in names)
            assert name not in names and getattr(m, "_compile_eager", False) == inside, name


def test_weight_gradients_stay_deferrable():
    """A pipeline executor points the Linears at a store only for the backward (zero-bubble W): a compiled
    module must leave every weight gradient of its Linears to that store, as eager does."""
    eager, compiled = _pair()
    tokens, labels = _batches(1)[0]
    stored = {}
    for model in (eager, compiled):
        loss = model.loss(tokens, labels, mtp_lambda=0.3).loss
        store, linears = WeightGradStore(), [m for m in model.modules() if isinstance(m, (Linear, GroupedLinear))]
        for m in linears:
            m.wgrad_store = store
        loss.backward()
        for m in linears:
            m.wgrad_store = None
        assert all(m.weight.grad is None for m in linears)  # B ran, W not yet
        stored[model is compiled] = len(store)
        store.flush()
    assert stored[True] == stored[False]
    weights = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert_close(p.grad, weights[name].grad, msg=name)


def test_compiled_forward_inside_a_backward_as_dualpipe_overlaps_them():
    """DualPipe's overlapped chunk (parallel/pipeline/overlap.py) runs one micro-batch's forward, compiled modules
    included, inside the other's backward exchanges: the same losses and gradients as eager."""
    from parallel.pipeline.overlap import ForwardInBackward
    from parallel.pipeline.stage import MicroBatch, StageSpec, stage_forward, stage_steps
    from tests.unit.test_overlap import _Loopback

    results = []
    for model in _pair():
        moes = [layer.ffn for layer in model.layers.values() if isinstance(layer.ffn, MoE)]
        for moe in moes:
            moe.dispatcher = _Loopback([], 1)
        spec = StageSpec(0, 1, range(2))
        b0, b1 = (MicroBatch(tokens, labels) for tokens, labels in _batches(2))
        loss0 = stage_forward(model, spec, None, b0, 0.3).loss
        driver = ForwardInBackward(stage_steps(model, spec, None, b1, 0.3), [moe.dispatcher for moe in moes])
        loss1 = driver.run(lambda loss0=loss0: loss0.backward()).loss
        assert driver.resumed == 2  # the MoE layer's two exchanges each ran a piece of the forward
        loss1.backward()
        results.append(((loss0.detach(), loss1.detach()), {n: p.grad for n, p in model.named_parameters()}))
    (ref_losses, ref_grads), (losses, grads) = results
    assert_close(losses, ref_losses)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, msg=name)


def _saved_bytes(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes the forward keeps for backward (each storage once), then the backward."""
    seen: set[tuple[int, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(tokens, labels, mtp_lambda=0.3).loss
    loss.backward()
    return sum(nbytes for _, nbytes in seen)


@pytest.mark.parametrize("flags", [{"recompute_norm": True}, {"recompute_norm": True, "recompute_mla_up_proj": True},
                                   {"fp8": True}], ids=["recompute_norm", "recompute_both", "fp8_emulate"])
def test_recompute_and_fp8_train_alike(flags):
    eager, compiled = _pair(**flags)
    names = compiled_modules(compiled)
    recompute_norm, up_proj = flags.get("recompute_norm", False), flags.get("recompute_mla_up_proj", False)
    assert any(n.endswith("attn") for n in names) != up_proj  # the checkpointed MLA stays eager
    assert any(n.endswith("norm") for n in names) != recompute_norm  # a recomputed norm marks its output: eager
    assert "layers.0.ffn" in names and "layers.1.ffn.shared_experts" in names
    if recompute_norm and not up_proj:  # the latent norms inside a compiled MLA run eagerly
        assert getattr(compiled.layers["1"].attn.kv_norm, "_compile_eager", False)
    _train_alike(eager, compiled)
    tokens, labels = _batches(1)[0]  # and the memory savers still save: no more kept for backward than eager
    assert _saved_bytes(compiled, tokens, labels) <= _saved_bytes(eager, tokens, labels)


@pytest.mark.slow
def test_inductor_training_matches_eager():
    cfg = small_config(n_layers=2)
    torch.manual_seed(0)
    eager, compiled = Transformer(cfg), Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    assert compile_dense(compiled) == len(DENSE)
    _train_alike(eager, compiled)  # fused kernels sum in another order: fp32 tolerance, not bitwise


def test_trainer_compile_applies_compile_dense():
    from parallel.grid import ProcessGrid
    from trainer.config import compose_config, load_config
    from trainer.train import build_model

    overrides = ["model.n_layers=2", "model.dim=64", "model.vocab_size=512", "model.n_routed_experts=8",
                 "model.n_group=2", "model.topk_group=1", "model.n_activated_experts=2", "data.vocab_size=512"]
    for on in (False, True):
        cfg = load_config(compose_config([*overrides, f"trainer.compile={str(on).lower()}"]), 1)
        model = build_model(cfg, ProcessGrid.build(cfg.parallel, "cpu")).model
        assert compiled_modules(model) == ([name for name, _ in dense_modules(model)] if on else [])
