"""DeepSeekMoE (paper 2.1.2): shared experts plus fine-grained routed SwiGLU experts, and load balancing.

Router (fp32): affinity s = sigmoid(u . e_i); a per-expert bias b_i only chooses experts (top-K of s + b
within the `topk_group` best groups, group score = sum of the group's two largest biased scores, other
groups masked with -inf); the gate is the chosen affinities normalised to sum 1, times
`routed_scaling_factor`. No token is dropped.

Balancing:
- aux-loss-free: the router counts tokens per expert while training; the trainer all-reduces the counts and
  applies `update_bias` (b += gamma * sign(mean - load)) once per step;
- the complementary sequence-wise loss (alpha * sum_i f_i P_i per sequence) with `balance: aux_free`; without
  the bias, the classic auxiliary loss (the same formula with its own weight, DeepSeek-V2's expert-level loss and
  the baseline of the paper's Table 5) per sequence with `balance: aux_loss`, or over all the tokens of the
  micro-batch with `balance: batch_aux` (paper 4.5.3: batch-wise versus sequence-wise balancing scope). A true
  whole-batch scope would need the expert counts of every micro-batch and DP rank before any backward; the
  micro-batch is the largest scope a rank sees at once. The loss is attached to the activations by `AttachLoss`
  so that a pipeline stage still passes a single tensor.

Routed experts run as grouped GEMMs over rows sorted by expert (`model.linear.GroupedLinear`).

Dispatch and combine are a dispatcher's (`LocalDispatcher` here, parallel/expert.py's all-to-all under expert
parallelism); a dispatch delivers a `Dispatched`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.linear import GroupedLinear, Linear, swiglu_experts
from model.swiglu import swiglu


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense FFN and shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


def _counting() -> bool:
    """True in a training forward, False under no_grad and in a checkpoint's non-counting pass.

    Reentrant checkpointing runs the real forward under no_grad and recomputes inside backward with grad
    on (count there); non-reentrant checkpointing runs the real forward with grad on and recomputes inside
    backward under its saved-tensor hooks (do not count again). PyTorch has no public flag for "this is a
    recomputation", hence the private calls.
    """
    if not torch.is_grad_enabled():
        return False
    in_backward = torch._C._current_graph_task_id() != -1
    return not in_backward or torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class Gate(Linear):
    """The router: u [N, dim] -> (affinities [N, E], expert ids [N, K], gate weights [N, K]), all fp32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.dim, cfg.n_routed_experts, dtype=torch.float32)
        self.compute_dtype = torch.float32  # routing in fp32 (paper 3.3)
        self.topk, self.n_group, self.topk_group = cfg.n_activated_experts, cfg.n_group, cfg.topk_group
        self.route_scale = cfg.routed_scaling_factor
        self.force_balance = cfg.force_balance
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # tokens routed to each expert since the trainer last read them (not checkpointed)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = super().forward(x).sigmoid()  # (N, E), in fp32 from x in its own dtype (kept so for backward)
        idx = self.select(scores.detach())
        weights = scores.gather(1, idx)
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale  # (N, K)
        if _counting():  # on the device (a bincount would sync the host)
            flat = idx.flatten()
            counts = self.tokens_per_expert
            counts.index_add_(0, flat, torch.ones(flat.shape, dtype=counts.dtype, device=flat.device))
        return scores, idx, weights

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited top-K of the biased scores; the bias never reaches the gate value. With force_balance,
        round-robin instead: token t gets experts tK .. tK + K - 1 modulo E."""
        if self.force_balance:
            n, e = scores.shape
            slots = torch.arange(n, device=scores.device).unsqueeze(1) * self.topk
            return (slots + torch.arange(self.topk, device=scores.device)) % e
        biased = scores + self.bias  # (N, E)
        if self.n_group > 1:
            grouped = biased.unflatten(1, (self.n_group, -1))  # (N, G, E/G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1).indices  # (N, K)


def gates(model: nn.Module) -> dict[str, Gate]:
    """Every router of a model, keyed by its module path (e.g. "layers.5.ffn.gate", "mtp.0.block.ffn.gate")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Gate)}


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free bias update (paper 2.1.2): b_i + gamma * sign(mean load - load_i)."""
    return bias + gamma * torch.sign(load.float().mean() - load.float())


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise loss (paper eq. 17-20), averaged over the sequences of the batch.

    scores [B*T, E] (fp32 affinities), idx [B*T, K]. f_i = E / (K T) * #tokens of the sequence choosing i,
    P_i = mean over the sequence of s_{i,t} / sum_j s_{j,t}.
    """
    n_experts, k = scores.shape[1], idx.shape[1]
    s = scores.view(batch, -1, n_experts)  # (B, T, E)
    t = s.shape[1]
    chosen = torch.zeros_like(s).scatter_(2, idx.view(batch, t, k), 1.0)
    f = chosen.sum(1) * (n_experts / (k * t))  # (B, E)
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return alpha * (f * p).sum(-1).mean()


def expert_balance_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """The expert-level auxiliary loss over all tokens of the micro-batch (`balance: batch_aux`, paper 4.5.3)."""
    n_tokens, n_experts = scores.shape
    k = idx.shape[1]
    flat = idx.flatten()
    chosen = torch.zeros(n_experts, dtype=torch.float32, device=scores.device).index_add_(
        0, flat, torch.ones(flat.shape, dtype=torch.float32, device=scores.device))
    f = chosen * (n_experts / (k * n_tokens))
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    return alpha * (f * p).sum()


class AttachLoss(torch.autograd.Function):
    """Return x unchanged; in backward, also send d(loss) = scale into `loss`'s graph.

    This attaches an auxiliary loss to an activation, so that the loss trains the router without being
    returned by the model (a pipeline stage passes one tensor).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class RoutedExperts(nn.Module):
    """E SwiGLU experts as three grouped GEMMs: w1/w3 [E, inter, dim], w2 [E, dim, inter]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, expert_gemm: str = "grouped_mm") -> None:
        super().__init__()
        self.n_experts = n_experts
        self.w1 = GroupedLinear(n_experts, dim, inter_dim, expert_gemm)
        self.w2 = GroupedLinear(n_experts, inter_dim, dim, expert_gemm)
        self.w3 = GroupedLinear(n_experts, dim, inter_dim, expert_gemm)

    def forward(self, rows: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, packed: Any = None,
                expert_counts: list[int] | None = None, complete: bool = False) -> torch.Tensor:
        """rows [R, dim]; expert_ids [R, K] local ids (-1 = expert not here); weights [R, K] fp32; `packed`,
        `expert_counts` and `complete` as in `Dispatched`. The number of valid slots comes from `expert_counts` or
        `complete` without a host sync, else it is read from the device (one sync).

        Returns [R, dim]: sum_k weights[r, k] * expert_{ids[r, k]}(rows[r]), accumulated in fp32 (DeepEP's
        normal-mode layout: one row per token and destination, weighted before the combine).
        """
        k = expert_ids.shape[1]
        flat = expert_ids.flatten()
        sort_key = torch.where(flat < 0, self.n_experts, flat)
        order = torch.argsort(sort_key, stable=True)
        counts = torch.zeros(self.n_experts + 1, dtype=torch.long, device=flat.device).index_add_(
            0, sort_key, torch.ones_like(sort_key))[: self.n_experts]  # on the device: no host sync
        if expert_counts is not None:
            n_valid = sum(expert_counts)
        else:
            n_valid = flat.numel() if complete else int((flat >= 0).sum())
        pairs = order[:n_valid]  # (M,) flat (row, slot) indices sorted by expert
        token = pairs // k  # one index tensor for the gather and the combine (both keep it for backward)
        y = swiglu_experts(self.w1, self.w3, self.w2, rows, token, counts, packed, expert_counts,
                           weights.flatten()[pairs])  # (M, dim), already weighted
        return _ScatterAddFn.apply(y, token, rows.shape[0])


class _ScatterAddFn(torch.autograd.Function):
    """out[t] = the sum over the rows m of token t of y[m], in fp32, cast to y's dtype. Keeps only the index for
    backward (autograd's index_add would keep its source too)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, token: torch.Tensor, n_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(token)
        acc = torch.promote_types(y.dtype, torch.float32)
        out = torch.zeros(n_tokens, y.shape[1], dtype=acc, device=y.device)
        return out.index_add_(0, token, y.to(acc)).to(y.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (token,) = ctx.saved_tensors
        return dout.index_select(0, token), None, None


class Dispatched(NamedTuple):
    """What a dispatch delivers to the experts of this rank."""

    rows: torch.Tensor  # [R, dim] one row per (token, destination), in the compute dtype
    expert_ids: torch.Tensor  # [R, K] local expert ids, -1 where the slot's expert lives elsewhere
    weights: torch.Tensor  # [R, K] fp32 gate weights, 0 where expert_ids is -1
    layout: Any  # what the combine needs to send the outputs back (None when nothing travelled)
    packed: Any = None  # the payload's form of the rows, e.g. their E4M3 bytes and scales; None: sent as they are
    # (row, slot) pairs per local expert on the host: the expert GEMMs' sizes, which the expert-parallel dispatch
    # knows without a host sync of its own from its counts exchange; None: not known on the host
    expert_counts: list[int] | None = None
    complete: bool = False  # every slot of expert_ids names a local expert (no -1), as in the local dispatch


class Ready:
    """An exchange that completed when it started: `wait()` returns its result."""

    def __init__(self, result: object) -> None:
        self.result = result

    def wait(self) -> object:
        return self.result


class LocalDispatcher:
    """Dispatch/combine inside one process: every expert is local, so both are identities.

    parallel/expert.py provides the expert-parallel dispatcher with the same interface (`dispatch_async` and
    `combine_async` return a handle whose `wait()` gives the result); the model never knows which one it runs
    with.
    """

    linked_s = 0.0  # simulated link seconds of exchanges: none here
    clock = None  # no exchange to time (the all-to-all dispatcher's clock times its waits)
    tag = ""  # the kind of pipeline action running, which an executor sets on every dispatcher
    during_exchange = None  # no backward exchange to run anything behind

    def dispatch_async(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> Ready:
        """h [N, dim], idx/weights [N, K] -> a `Dispatched` once waited for."""
        return Ready(Dispatched(h, idx, weights, None, complete=True))

    def combine_async(self, y: torch.Tensor, layout: object) -> Ready:
        return Ready(y)


class MoE(nn.Module):
    """Router + shared experts + routed experts; run as phases by `model.transformer.Block`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.expert_gemm)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.balance, self.seq_aux_alpha, self.aux_loss_alpha = cfg.balance, cfg.seq_aux_alpha, cfg.aux_loss_alpha
        self.dispatcher = LocalDispatcher()
        self.aux_loss_scale = 1.0  # multiplier of the attached loss's gradient (e.g. 1 / micro-batches)
        self.last_aux_loss: torch.Tensor | None = None  # detached, for logging

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, dim] -> (h with the balance loss attached, expert ids [B*T, K], gate weights [B*T, K])."""
        scores, idx, weights = self.gate(h.flatten(0, 1))
        loss = None
        if self.balance == "aux_free" and self.seq_aux_alpha > 0:
            loss = sequence_balance_loss(scores, idx, h.shape[0], self.seq_aux_alpha)
        elif self.balance == "aux_loss" and self.aux_loss_alpha > 0:
            loss = sequence_balance_loss(scores, idx, h.shape[0], self.aux_loss_alpha)
        elif self.balance == "batch_aux" and self.aux_loss_alpha > 0:
            loss = expert_balance_loss(scores, idx, self.aux_loss_alpha)
        if loss is not None and torch.is_grad_enabled():
            self.last_aux_loss = loss.detach()
            h = AttachLoss.apply(h, loss, self.aux_loss_scale)
        return h, idx, weights
