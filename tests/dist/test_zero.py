"""ZeRO-1 (parallel/zero.py) against the single-process optim.adamw.AdamW on the global-average gradient.

One 4-process gloo spawn runs every distributed check, for three setups: dense only (fp32 parameters, fp32
moments, DP 4); an expert-tagged parameter with EP 2 (EP groups [0,1] [2,3], expert-DP groups [0,2] [1,3]) in fp32;
and the same in bf16 with fp32 main grads (attach_main_grads) and bf16 moments. Each rank computes gradients on
its own data; the all-to-all of expert parallelism is emulated by summing the full expert gradient over the EP
group and keeping the local experts, which is what the dispatcher's backward delivers. The reference, built on
every rank, holds the full model and takes AdamW steps on the mean of all ranks' gradients.

Tolerances: ZeRO sums the ranks' gradients in gloo's reduce-scatter order while the reference sums them in rank
order, so the gradients differ by fp32 rounding (~1e-7 relative) and so do the updates (|update| <= lr); fp32
checks use rtol 1e-5 / atol 1e-6. With bf16 moments such a difference can flip a bf16 rounding of a moment
(2^-8 relative), and bf16 parameters can round to the neighbouring bf16 value, which then feeds later gradients:
those checks allow one bf16 ulp (rtol/atol 1e-2 on parameters, 1e-4 absolute on fp32 masters, 1e-3 relative
on the norm).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from model.grads import attach_main_grads, grad_of
from optim.adamw import AdamW
from optim.config import OptimConfig
from optim.optimizer import clip_grad_norm_
from parallel.expert import is_expert_param
from parallel.zero import ZeroOptimizer
from tests.dist.conftest import run_distributed

N_EXPERTS, D_IN, D_HID = 4, 6, 12
EXPERT = "ffn.experts.w"


class Tiny(nn.Module):
    """Two Linear layers around an RMS norm (decayed matrices, undecayed biases and norm weight), plus optional
    'routed experts' [E, D_IN, D_IN] mixed by a softmax gate, so each expert gets a different gradient."""

    def __init__(self, experts: bool) -> None:
        super().__init__()
        self.lin1 = nn.Linear(D_IN, D_HID)
        self.norm = nn.Parameter(1 + 0.1 * torch.randn(D_HID))
        self.lin2 = nn.Linear(D_HID, D_IN)
        if experts:
            self.ffn = nn.Module()
            self.ffn.experts = nn.Module()
            self.ffn.experts.w = nn.Parameter(0.3 * torch.randn(N_EXPERTS, D_IN, D_IN))

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lin1.weight.dtype)
        h = self.lin1(x)
        h = torch.tanh(h * torch.rsqrt(h.float().square().mean(-1, keepdim=True) + 1e-6).to(h.dtype) * self.norm)
        y = self.lin2(h)
        if hasattr(self, "ffn"):
            gate = torch.softmax(x[:, :N_EXPERTS].float(), -1).to(x.dtype)
            y = y + torch.einsum("be,bi,eij->bj", gate, x, self.ffn.experts.w)
        return (y.float() - target).square().mean()


def _data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5, D_IN, generator=g), torch.randn(5, D_IN, generator=g)


def _clear(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "main_grad"):
            p.main_grad = None


def _set_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    if hasattr(p, "main_grad"):
        p.main_grad = g.float().clone()
    else:
        p.grad = g.to(p.dtype).clone()


def _reference_grads(ref: nn.Module, step: int, ranks: list[int]) -> None:
    """The gradient of the mean loss over `ranks`' data: per-rank gradients, summed in rank order, / len."""
    total: dict[str, torch.Tensor] = {}
    for r in ranks:
        _clear(ref)
        ref.loss(*_data(step, r)).backward()
        for name, p in ref.named_parameters():
            g = grad_of(p).float()
            total[name] = total[name] + g if name in total else g.clone()
    _clear(ref)
    for name, p in ref.named_parameters():
        _set_grad(p, total[name] / len(ranks))


class Sharded:
    """The ZeRO side on one rank: a full model replica whose dense parameters train, plus this EP rank's slice
    of the experts as its own parameter (named like the full one, as parallel.parallelize does)."""

    def __init__(self, model: nn.Module, ep_group: dist.ProcessGroup | None, ep_rank: int, ep: int) -> None:
        self.model, self.ep_group, self.ep, self.ep_rank = model, ep_group, ep, ep_rank
        self.per = N_EXPERTS // ep
        self.local: nn.Parameter | None = None
        if hasattr(model, "ffn"):
            w = model.ffn.experts.w
            self.local = nn.Parameter(w.detach()[ep_rank * self.per:(ep_rank + 1) * self.per].clone())
            if w.dtype != torch.float32:
                attach_main_grads([self.local])

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        out = [(n, p) for n, p in self.model.named_parameters() if n != EXPERT]
        return out + ([(EXPERT, self.local)] if self.local is not None else [])

    def backward(self, step: int, rank: int) -> None:
        """Own data only; the expert gradient summed over the EP group, local slice kept (the all-to-all)."""
        _clear(self.model)
        if self.local is not None:  # the forward needs every expert: assemble them over EP
            parts = [torch.empty_like(self.local) for _ in range(self.ep)]
            dist.all_gather(parts, self.local.detach().contiguous(), group=self.ep_group)
            with torch.no_grad():
                self.model.ffn.experts.w.copy_(torch.cat(parts))
        self.model.loss(*_data(step, rank)).backward()
        if self.local is not None:
            g = grad_of(self.model.ffn.experts.w).float()
            dist.all_reduce(g, group=self.ep_group)
            _set_grad(self.local, g[self.ep_rank * self.per:(self.ep_rank + 1) * self.per])

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_params()}


def _local_view(ref: nn.Module, sh: Sharded) -> dict[str, torch.Tensor]:
    """The reference parameters cut like the sharded side (the local experts)."""
    out = {n: p.detach() for n, p in ref.named_parameters() if n != EXPERT}
    if sh.local is not None:
        out[EXPERT] = ref.ffn.experts.w.detach()[sh.ep_rank * sh.per:(sh.ep_rank + 1) * sh.per]
    return out


def _local_state(state: dict[str, torch.Tensor], sh: Sharded) -> dict[str, torch.Tensor]:
    return {k: (t[sh.ep_rank * sh.per:(sh.ep_rank + 1) * sh.per] if k.endswith(EXPERT) and t.dim() else t)
            for k, t in state.items()}


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for k in actual:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{what} {k}: {m}")


def _scenario(rank: int, world: int, experts: bool, dtype: torch.dtype, moments: str) -> None:
    ep = 2 if experts else 1
    # Megatron order: EP contiguous ([0,1] [2,3]), expert-DP strided ([0,2] [1,3]); every rank creates every group.
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    edp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_group, ep_rank = ep_groups[rank // 2], rank % 2
    fp32 = dtype == torch.float32 and moments == "fp32"
    ptol = dict(rtol=1e-5, atol=1e-6) if fp32 else dict(rtol=1e-2, atol=1e-2)
    stol = dict(rtol=1e-5, atol=1e-6) if fp32 else dict(rtol=1e-2, atol=1e-4)
    ntol = 1e-5 if fp32 else 1e-3  # relative, on the gradient norm
    cfg = OptimConfig(moment_dtype=moments, weight_decay=0.1, beta2=0.95)
    lr = 1e-2

    torch.manual_seed(0)
    ref = Tiny(experts).to(dtype)
    model = copy.deepcopy(ref)
    if dtype != torch.float32:
        attach_main_grads(ref.parameters())
        attach_main_grads(model.parameters())
    sh = Sharded(model, ep_group if experts else None, ep_rank if experts else 0, ep)
    zero = ZeroOptimizer(sh.named_params(), cfg, dp_group=None,
                         expert_dp_group=edp_groups[rank % 2] if experts else None, is_expert=is_expert_param)
    ref_opt = AdamW(ref.named_parameters(), cfg)

    # Steps 0..4: step 2 clips, step 3 has an inf gradient on rank 1 and must be skipped everywhere.
    for step in range(5):
        _reference_grads(ref, step, list(range(world)))
        sh.backward(step, rank)
        ref_norm = clip_grad_norm_(ref.parameters(), 0.0)
        max_norm = float(ref_norm) / 2 if step == 2 else 1e3
        if step == 3:
            before = {n: t.clone() for n, t in sh.params().items()}
            if rank == 1:
                grad_of(model.lin1.weight)[0, 0] = float("inf")
            norm = zero.step(lr, max_norm)
            assert not torch.isfinite(torch.tensor(norm)), norm
            _close(sh.params(), before, dict(rtol=0, atol=0), "params after a non-finite step")
        else:
            assert abs(zero.grad_norm().item() - ref_norm.item()) <= ntol * ref_norm.item()
            norm = zero.step(lr, max_norm)
            assert abs(norm - ref_norm.item()) <= ntol * ref_norm.item(), (norm, ref_norm)
            clip_grad_norm_(ref.parameters(), max_norm)
            ref_opt.step(lr)
            _close(sh.params(), _local_view(ref, sh), ptol, f"params after step {step}")
        zero.zero_grad()
        ref_opt.zero_grad()
        _clear(model)

    # Full state: AdamW's keys, equal to the reference (experts: this EP rank's slice).
    full = zero.full_state_dict()
    _close(full, _local_state(ref_opt.state_dict(), sh), stol, "full_state_dict")
    assert int(full[f"step.{next(iter(zero.params))}"]) == 4  # the skipped step is not counted

    # Reload into DP 2 (sub-worlds [0,1] and [2,3]); with EP 2 the expert-DP groups become single ranks.
    dp2_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    single = [dist.new_group([r]) for r in range(world)]
    sub = [0, 1] if rank < 2 else [2, 3]
    model2 = copy.deepcopy(model)
    sh2 = Sharded(model2, ep_group if experts else None, sh.ep_rank, ep)
    with torch.no_grad():
        if sh.local is not None:
            sh2.local.copy_(sh.local)
    zero2 = ZeroOptimizer(sh2.named_params(), cfg, dp_group=dp2_groups[rank // 2],
                          expert_dp_group=single[rank] if experts else None, is_expert=is_expert_param)
    zero2.load_full_state_dict(full)
    _close(zero2.full_state_dict(), full, dict(rtol=0, atol=0), "dp2 reload round trip")
    with pytest.raises(ValueError, match="missing"):
        zero2.load_full_state_dict({k: v for k, v in full.items() if not k.startswith("exp_avg_sq.")})

    # The sharded form: every rank's shards() (DP 4), assembled by range, loaded into another DP-2 optimizer that
    # reads only its own ranges, give the same state. Expert ranges index local experts: for expert keys use the
    # saving ranks with this rank's EP rank; dense keys come from all four.
    everyone: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, zero.shards())
    owned: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(owned, zero.owned())
    for name, p in zero.params.items():  # owned() partitions each (local) parameter over its ZeRO group
        group = [r for r in range(world) if not (experts and name.endswith(EXPERT)) or r % 2 == sh.ep_rank]
        cover = sorted(owned[r][name] for r in group if name in owned[r])
        assert cover[0][0] == 0 and cover[-1][1] == p.numel(), (name, cover)
        assert all(x[1] == y[0] for x, y in zip(cover, cover[1:])), (name, cover)

    def read(key: str, a: int, z: int) -> torch.Tensor:
        expert = key.endswith(EXPERT) and not key.startswith("step.")
        whole = torch.zeros(full[key].numel(), dtype=full[key].dtype)
        for r, st in enumerate(everyone):
            if key in st and not (experts and expert and r % 2 != sh.ep_rank):
                start, data = st[key]
                whole[start:start + data.numel()] = data
        return whole[a:z]

    model3 = copy.deepcopy(model)
    sh3 = Sharded(model3, ep_group if experts else None, sh.ep_rank, ep)
    zero3 = ZeroOptimizer(sh3.named_params(), cfg, dp_group=dp2_groups[rank // 2],
                          expert_dp_group=single[rank] if experts else None, is_expert=is_expert_param)
    zero3.load_shards({k: t.shape for k, t in full.items()}, read)
    _close(zero3.full_state_dict(), full, dict(rtol=0, atol=0), "sharded-form reload")

    # Single-process AdamW resumed from the ZeRO state (experts assembled over EP), trained on the sub-world's
    # data, must match the DP-2 ZeRO continuation.
    ref2_model = copy.deepcopy(model)
    if experts:
        with torch.no_grad():
            parts = [torch.empty_like(sh.local) for _ in range(ep)]
            dist.all_gather(parts, sh.local.detach(), group=ep_group)
            ref2_model.ffn.experts.w.copy_(torch.cat(parts))
    ref2 = AdamW(ref2_model.named_parameters(), cfg)
    whole = dict(full)
    for key, t in full.items():  # the expert entries (not the 0-d steps) assembled over the EP group
        if experts and key.endswith(EXPERT) and not key.startswith("step."):
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=ep_group)
            whole[key] = torch.cat(parts)
    ref2.load_state_dict(whole)
    for step in range(5, 7):
        _reference_grads(ref2_model, step, sub)
        sh2.backward(step, rank)
        norm = zero2.step(lr, 1e3)
        ref_norm = clip_grad_norm_(ref2_model.parameters(), 1e3)
        ref2.step(lr)
        assert abs(norm - ref_norm.item()) <= ntol * ref_norm.item(), (norm, ref_norm)
        _close(sh2.params(), _local_view(ref2_model, sh2), ptol, f"DP-2 continuation step {step}")
        zero2.zero_grad()
        ref2.zero_grad()


def _zero_worker(rank: int, world: int) -> None:
    _scenario(rank, world, experts=False, dtype=torch.float32, moments="fp32")
    _scenario(rank, world, experts=True, dtype=torch.float32, moments="fp32")
    _scenario(rank, world, experts=True, dtype=torch.bfloat16, moments="bf16")


@pytest.mark.slow
def test_zero_matches_single_process_adamw() -> None:
    run_distributed(_zero_worker, 4)


def test_zero_single_process_is_bitwise_adamw() -> None:
    """DP = 1 without torch.distributed: the flat-shard update is the same arithmetic as AdamW, bit for bit
    (no clipping: the norm itself is summed in another order)."""
    torch.manual_seed(0)
    model = Tiny(experts=True)
    ref = copy.deepcopy(model)
    cfg = OptimConfig(moment_dtype="fp32")
    zero = ZeroOptimizer(model.named_parameters(), cfg, None, None, is_expert_param)
    ref_opt = AdamW(ref.named_parameters(), cfg)
    for step in range(3):
        for m in (model, ref):
            m.loss(*_data(step, 0)).backward()
        zero.step(1e-2, 0.0)
        ref_opt.step(1e-2)
        zero.zero_grad()
        ref_opt.zero_grad()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
    state, ref_state = zero.full_state_dict(), ref_opt.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    n = sum(p.numel() for p in model.parameters())
    assert zero.optimizer_state_bytes() >= 12 * n  # fp32 master + two fp32 moments (+ padding)
