"""AdamW with fp32 masters and bf16 moments against torch.optim.AdamW, resume, gradient clipping, schedules."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core.config import from_dict
from model import ConfigError
from optim.adamw import AdamW, adamw_update
from optim.config import OptimConfig
from optim.optimizer import clip_grad_norm_, grad_norm_sq
from optim.schedules import batch_size_at, bias_gamma_at, lr_at, mtp_lambda_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "optim"


class Tiny(nn.Module):
    """Embedding, matrices, vectors, and a layer that never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 5, bias=False)
        self.unused = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(x))) * self.norm
        return self.head(h.to(self.head.weight.dtype))  # the head may stay fp32 in a bf16 model


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def backward(model: Tiny, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 5, (4, 6), generator=g)
    F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()


def synthetic_grads(model: nn.Module, step: int) -> None:
    """The same gradient values for every model, whatever its dtype (rounded to bf16 where the param is bf16)."""
    g = torch.Generator().manual_seed(2000 + step)
    for name, p in model.named_parameters():
        if not name.startswith("unused"):
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16).to(p.dtype)


def config(**overrides) -> OptimConfig:
    values = dict(lr=1e-2, weight_decay=0.1, moment_dtype="fp32")
    values.update(overrides)
    return OptimConfig(**values).validate()


def preset(name: str) -> OptimConfig:
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    return from_dict(OptimConfig, values, prefix="optim").validate()


# ---- AdamW ---------------------------------------------------------------------------------------------------


def test_fp32_matches_torch_adamw_bitwise():
    cfg = config()
    ours, ref = tiny(), tiny()
    opt = AdamW(ours.named_parameters(), cfg)
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.ndim < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    assert not opt.masters  # fp32 params are their own masters
    for step in range(5):
        lr = cfg.lr * (step + 1) / 5
        for model in (ours, ref):
            backward(model, step)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        opt.step(lr)
        torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), f"{name} differs at step {step}"
            if q in torch_opt.state:
                assert torch.equal(opt.exp_avg[name], torch_opt.state[q]["exp_avg"])
                assert torch.equal(opt.exp_avg_sq[name], torch_opt.state[q]["exp_avg_sq"])
    assert opt.steps["proj.weight"] == 5 and opt.steps["unused.weight"] == 0


def test_bf16_params_keep_fp32_master():
    cfg = config()
    model, ref = tiny(), tiny()
    model.to(torch.bfloat16)
    model.head.float()  # stays fp32, like the router: its own master
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            q.copy_(p.float())  # the same starting values
    opt, ref_opt = AdamW(model.named_parameters(), cfg), AdamW(ref.named_parameters(), cfg)
    assert sorted(opt.masters) == sorted(n for n, p in model.named_parameters() if p.dtype == torch.bfloat16)
    assert opt.master("head.weight").data_ptr() == model.head.weight.data_ptr()
    for step in range(6):
        synthetic_grads(model, step)
        synthetic_grads(ref, step)
        opt.step(cfg.lr)
        ref_opt.step(cfg.lr)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # Same fp32 gradients and arithmetic: the master follows the fp32 run exactly.
        assert torch.equal(opt.master(name), q), name
        assert torch.equal(p, opt.master(name).to(p.dtype)), name


def test_master_keeps_updates_smaller_than_a_bf16_ulp():
    cfg = config(lr=1e-4, weight_decay=0.0)
    ours = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    naive = copy.deepcopy(ours)
    with torch.no_grad():
        ours.weight.fill_(1.0)
        naive.weight.fill_(1.0)
    opt = AdamW(ours.named_parameters(), cfg)
    naive_opt = torch.optim.AdamW(naive.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    for _ in range(30):  # each step moves the weight by about lr = 1e-4, a bf16 half-ulp below 1.0 is 2^-9
        for m in (ours, naive):
            m.weight.grad = torch.ones_like(m.weight)
        opt.step(cfg.lr)
        naive_opt.step()
    assert torch.all(naive.weight == 1.0)  # every update rounded away
    assert torch.allclose(opt.master("weight"), torch.full((4, 4), 1 - 30 * cfg.lr), rtol=0, atol=1e-6)
    assert torch.all(ours.weight < 1.0)


def test_adamw_update_rounds_bf16_moments_after_fp32_arithmetic():
    cfg = config()
    g = torch.Generator().manual_seed(0)
    master = torch.randn(64, generator=g)
    grad = torch.randn(64, generator=g).to(torch.bfloat16)
    m16 = torch.randn(64, generator=g).to(torch.bfloat16)
    v16 = torch.rand(64, generator=g).to(torch.bfloat16)
    m32, v32, master32 = m16.float(), v16.float(), master.clone()
    adamw_update(master, grad, m16, v16, 3, cfg.lr, cfg, 0.1)
    adamw_update(master32, grad, m32, v32, 3, cfg.lr, cfg, 0.1)
    assert m16.dtype == v16.dtype == torch.bfloat16
    assert torch.equal(m16, m32.to(torch.bfloat16)) and torch.equal(v16, v32.to(torch.bfloat16))
    assert torch.equal(master, master32)  # the update uses the unrounded fp32 moments
    assert grad.dtype == torch.bfloat16  # the gradient is read, not changed
    with pytest.raises(ValueError, match="master weights must be fp32"):
        adamw_update(master.bfloat16(), grad, m16, v16, 1, cfg.lr, cfg, 0.1)


def test_bf16_moments_stay_close_to_fp32_moments():
    model16, model32 = tiny(), tiny()
    opt16 = AdamW(model16.named_parameters(), config(moment_dtype="bf16"))
    opt32 = AdamW(model32.named_parameters(), config(moment_dtype="fp32"))
    start = {n: p.detach().clone() for n, p in model32.named_parameters()}
    assert all(t.dtype == torch.bfloat16 for n, t in opt16.state_dict().items() if n.startswith("exp_avg"))
    for step in range(100):
        synthetic_grads(model16, step)
        synthetic_grads(model32, step)
        opt16.step(1e-2)
        opt32.step(1e-2)
    # Each stored moment is off by at most 2^-9 relative after rounding, so each update m / sqrt(v) is off by
    # about 2^-9 + 2^-10; over 100 steps these errors mostly cancel. Measured 0.3-0.4% of the displacement
    # norm; the bound allows 1%.
    for (name, p16), p32 in zip(model16.named_parameters(), model32.parameters()):
        if name.startswith("unused"):
            continue
        moved = p32 - start[name]
        assert (p16 - p32).norm() <= 1e-2 * moved.norm(), name


def test_no_weight_decay_on_vectors_and_no_update_without_grad():
    cfg = config()
    model = tiny()
    opt = AdamW(model.named_parameters(), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        if not name.startswith("unused"):
            p.grad = torch.zeros_like(p)  # a zero gradient: only weight decay moves a parameter
    opt.step(cfg.lr)
    for name, p in model.named_parameters():
        if name.startswith("unused"):
            assert torch.equal(p, before[name]) and opt.steps[name] == 0
        elif p.ndim >= 2:
            assert torch.equal(p, before[name] * (1 - cfg.lr * cfg.weight_decay)), name
        else:
            assert torch.equal(p, before[name]), name


def test_state_dict_round_trip_resumes_bitwise():
    cfg = config(moment_dtype="bf16")

    def build(seed: int) -> tuple[Tiny, AdamW]:
        model = tiny(seed).to(torch.bfloat16)
        model.head.float()
        return model, AdamW(model.named_parameters(), cfg)

    def train(model: Tiny, opt: AdamW, steps: range) -> None:
        for step in steps:
            backward(model, step)
            opt.step(cfg.lr)
            opt.zero_grad()

    straight, straight_opt = build(0)
    train(straight, straight_opt, range(5))
    first, first_opt = build(0)
    train(first, first_opt, range(3))
    blob = save_safetensors({**{f"model.{k}": v for k, v in first.state_dict().items()},
                             **{f"optim.{k}": v for k, v in first_opt.state_dict().items()}})
    loaded = load_safetensors(blob)
    resumed, resumed_opt = build(1)  # a different init, all overwritten by the checkpoint
    resumed_opt.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("optim.")})
    for (name, p), q in zip(resumed.named_parameters(), first.parameters()):
        assert torch.equal(p, q) == (name in resumed_opt.masters), name  # masters were rounded into the params
    resumed.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    train(resumed, resumed_opt, range(3, 5))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for (key, a), b in zip(straight_opt.state_dict().items(), resumed_opt.state_dict().values()):
        assert torch.equal(a, b), key


def test_load_state_dict_names_what_does_not_fit():
    model = tiny()
    opt = AdamW(model.named_parameters(), config())
    state = dict(opt.state_dict())
    del state["exp_avg.proj.weight"]
    state["exp_avg_sq.head.weight"] = torch.zeros(3, 3)
    state["exp_avg.gone"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(state)
    message = str(err.value)
    assert "missing [exp_avg.proj.weight]" in message
    assert "unexpected [exp_avg.gone]" in message
    assert "exp_avg_sq.head.weight (3, 3) (expected (5, 8))" in message
    bf16_opt = AdamW(tiny().to(torch.bfloat16).named_parameters(), config())
    with pytest.raises(ValueError, match=r"missing \[master\.embed\.weight"):
        bf16_opt.load_state_dict(opt.state_dict())  # saved with fp32 params: no masters


# ---- gradient clipping ---------------------------------------------------------------------------------------


def grads_of(seed: int) -> list[nn.Parameter]:
    model = tiny(seed)
    backward(model, seed)
    return list(model.parameters())


@pytest.mark.parametrize("max_norm", [0.05, 1e3, 0.0])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, ref = grads_of(0), grads_of(0)
    norm = clip_grad_norm_(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm else math.inf, foreach=False)
    assert norm.dtype == torch.float32 and norm.ndim == 0
    # Not bitwise: the norm is the square root of an explicit sum of squares (the value ZeRO all-reduces).
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    if max_norm == 0.05:
        assert norm > max_norm
        clipped = grad_norm_sq(p.grad for p in ours if p.grad is not None).sqrt()
        assert float(clipped) == pytest.approx(max_norm, rel=1e-5)  # max_norm * norm / (norm + 1e-6)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_grad_norm_returns_non_finite_without_clipping(bad):
    params = [p for p in grads_of(0) if p.grad is not None]
    params[-1].grad.view(-1)[0] = bad
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1e-3)
    assert math.isinf(norm) if bad == math.inf else math.isnan(norm)
    for a, p in zip(before, params):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0, equal_nan=True)


def test_grad_norm_is_fp32_for_bf16_grads():
    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3)]
    exact = torch.cat([g.double() for g in grads]).norm()
    assert grad_norm_sq(grads).dtype == torch.float32
    assert abs(float(grad_norm_sq(grads).sqrt()) - float(exact)) <= 1e-6 * float(exact)


# ---- schedules -----------------------------------------------------------------------------------------------


def schedule(**overrides) -> OptimConfig:
    values = dict(lr=1.0, min_lr=0.1, warmup_steps=10, constant_tokens=100.0, decay_tokens=50.0,
                  tail_lrs=[0.07, 0.03], tail_tokens=[20.0, 10.0])
    values.update(overrides)
    return OptimConfig(**values).validate()


def test_lr_phases():
    c = schedule()
    assert lr_at(c, 0, 0) == c.lr / c.warmup_steps
    assert lr_at(c, c.warmup_steps - 1, 0) == c.lr  # the last warm-up step has the peak
    assert lr_at(c, c.warmup_steps, 50.0) == c.lr
    decay_end = c.constant_tokens + c.decay_tokens
    assert lr_at(c, 10**6, c.constant_tokens) == c.lr
    assert lr_at(c, 10**6, c.constant_tokens + c.decay_tokens / 2) == pytest.approx((c.lr + c.min_lr) / 2)
    assert lr_at(c, 10**6, decay_end - 1e-9) == pytest.approx(c.min_lr)
    assert lr_at(c, 10**6, decay_end) == c.tail_lrs[0]
    assert lr_at(c, 10**6, decay_end + c.tail_tokens[0] - 1e-9) == c.tail_lrs[0]
    assert lr_at(c, 10**6, decay_end + c.tail_tokens[0]) == c.tail_lrs[1]
    assert lr_at(c, 10**6, decay_end + sum(c.tail_tokens)) == c.tail_lrs[-1]
    assert lr_at(c, 10**9, 1e18) == c.tail_lrs[-1]
    assert lr_at(c, 3, 1e18) == c.lr * 4 / c.warmup_steps  # warm-up takes precedence
    assert lr_at(schedule(tail_lrs=[], tail_tokens=[]), 10**6, 1e18) == c.min_lr
    assert lr_at(schedule(warmup_steps=0), 0, 0) == c.lr


def test_lr_never_rises_after_warm_up():
    c = preset("deepseek_v3")
    lrs = [lr_at(c, c.warmup_steps, t * 1e11) for t in range(200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_deepseek_v3_preset_matches_the_paper():
    c = preset("deepseek_v3")
    assert (c.beta1, c.beta2, c.weight_decay, c.grad_clip, c.moment_dtype) == (0.9, 0.95, 0.1, 1.0, "bf16")
    assert lr_at(c, 1999, 0) == pytest.approx(2.2e-4, rel=1e-12)
    assert lr_at(c, 2000, 5e12) == pytest.approx(2.2e-4, rel=1e-12)
    assert lr_at(c, 10**6, 14.3e12 - 1) == pytest.approx(2.2e-5, rel=1e-9)  # cosine end
    assert lr_at(c, 10**6, 14.3e12) == pytest.approx(2.2e-5, rel=1e-12)
    assert lr_at(c, 10**6, 14.8e12 - 167e9 - 1) == pytest.approx(2.2e-5, rel=1e-12)
    assert lr_at(c, 10**6, 14.8e12 - 167e9) == pytest.approx(7.3e-6, rel=1e-12)
    assert lr_at(c, 10**6, 14.8e12) == pytest.approx(7.3e-6, rel=1e-12)
    sizes = [batch_size_at(c, t * 1e10, 15360, 128) for t in range(60)]
    assert sizes[0] == 3072 and all(s == 15360 for s in sizes[47:])
    assert batch_size_at(c, 469e9, 15360, 128) == 15360 and batch_size_at(c, 469e9 - 1e9, 15360, 128) < 15360
    assert all(s % 128 == 0 for s in sizes) and all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert mtp_lambda_at(c, 10e12 - 1) == 0.3 and mtp_lambda_at(c, 10e12) == 0.1
    assert bias_gamma_at(c, 14.3e12 - 1) == 0.001 and bias_gamma_at(c, 14.3e12) == 0.0


def test_tiny_preset_has_the_paper_shape():
    c = preset("tiny")
    assert lr_at(c, c.warmup_steps - 1, 0) == c.lr
    assert lr_at(c, 10**6, c.constant_tokens + c.decay_tokens / 2) == pytest.approx((c.lr + c.min_lr) / 2)
    assert batch_size_at(c, 0, 8, 8) == 8


def test_batch_size_ramp():
    c = schedule(batch_ramp_start=100, batch_ramp_tokens=1000.0)
    sizes = [batch_size_at(c, t, 1024, 64) for t in range(0, 1200, 7)]
    assert sizes[0] == 64  # 100 rounded down to whole groups of micro-batches
    assert all(s % 64 == 0 and 64 <= s <= 1024 for s in sizes)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert batch_size_at(c, 999, 1024, 64) == 1024 - 64 and batch_size_at(c, 1000, 1024, 64) == 1024
    assert batch_size_at(schedule(batch_ramp_start=0), 0, 1024, 64) == 1024
    assert batch_size_at(schedule(batch_ramp_start=3072, batch_ramp_tokens=0), 0, 8, 8) == 8
    with pytest.raises(ValueError, match="global_batch_size=1000 must be a positive multiple"):
        batch_size_at(c, 0, 1000, 64)
    with pytest.raises(ValueError, match="batch_ramp_start=3072 exceeds"):
        batch_size_at(schedule(batch_ramp_start=3072), 0, 8, 8)


def test_lambda_and_gamma_switch_at_their_boundaries():
    c = schedule(mtp_lambda_switch_tokens=500.0, bias_gamma_stop_tokens=700.0)
    assert [mtp_lambda_at(c, t) for t in (0, 499.9, 500, 1e9)] == [c.mtp_lambda] * 2 + [c.mtp_lambda_late] * 2
    assert [bias_gamma_at(c, t) for t in (0, 699.9, 700, 1e9)] == [c.bias_gamma] * 2 + [0.0] * 2


def test_bf16_moments_reject_slow_betas():
    with pytest.raises(ConfigError, match="optim.moment_dtype=bf16 with optim.beta1=0.9, optim.beta2=0.999"):
        OptimConfig(beta2=0.999, moment_dtype="bf16").validate()
    OptimConfig(beta2=0.999, moment_dtype="fp32").validate()


def test_bf16_parameters_accumulate_micro_batches_in_fp32_main_grads():
    from model.grads import attach_main_grads, grad_of

    torch.manual_seed(11)
    w = torch.nn.Parameter(torch.randn(4, 8).to(torch.bfloat16))
    attach_main_grads([w])
    xs = [torch.randn(3, 8) for _ in range(4)]
    for x in xs:
        (x.to(torch.bfloat16) @ w.t()).float().square().sum().backward()
    assert w.grad is None and grad_of(w).dtype == torch.float32
    ref = torch.zeros(4, 8)
    for x in xs:  # the same per-micro-batch bf16 gradients, summed in fp32
        wr = w.detach().clone().requires_grad_()
        (x.to(torch.bfloat16) @ wr.t()).float().square().sum().backward()
        ref += wr.grad.float()
    assert torch.equal(grad_of(w), ref)


def test_zero_grad_after_a_skipped_step_drops_the_reduced_gradient():
    """A step skipped for a non-finite loss computes the norm (ZeRO reduces the gradients for it) but takes no
    update; zero_grad must then drop that reduced gradient, or the next step's norm and update would use it."""
    from parallel.expert import is_expert_param
    from parallel.zero import ZeroOptimizer

    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    opt = ZeroOptimizer(model.named_parameters(), OptimConfig(moment_dtype="fp32"), None, None, is_expert_param)
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    assert not math.isfinite(float(opt.grad_norm()))  # the skipped step: norm only
    opt.zero_grad()
    model.weight.grad = torch.ones_like(model.weight)
    assert float(opt.grad_norm()) == pytest.approx(math.sqrt(12))
    assert math.isfinite(opt.step(1e-3, 1.0))
