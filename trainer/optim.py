"""Optimizer and schedules (paper 4.2). OptimConfig is mirrored by configs/optim/*.yaml.

- `adamw_update`: the AdamW arithmetic on one fp32 master tensor, moments kept in bf16 or fp32 (paper 3.3,
  "Storage"). Stateless and elementwise, so the ZeRO-1 optimizer can run it on flat shards (or chunks of them).
- `AdamW`: that update over a model's parameters, with fp32 master copies of the non-fp32 ones.
- `clip_grad_norm_` / `grad_norm_sq`: the global gradient norm in fp32 and the clip at optim.grad_clip.
- `lr_at`, `batch_size_at`, `mtp_lambda_at`, `bias_gamma_at`: the paper's schedules as pure functions of the
  step and of the tokens consumed so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.config import ConfigError


@dataclass
class OptimConfig:
    """AdamW and every schedule of the paper, with token budgets as floats (1.0e13 = 10T tokens)."""

    # AdamW
    lr: float = 2.2e-4  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to weight matrices and embeddings, not to norms or router biases
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    moment_dtype: str = "bf16"  # AdamW first/second moments: bf16 (the paper) | fp32
    # learning rate: linear warm-up (steps), constant (tokens), cosine to min_lr (tokens), constant tails
    warmup_steps: int = 2000
    constant_tokens: float = 1.0e13  # tokens from the start until the cosine decay begins
    decay_tokens: float = 4.3e12  # length of the cosine decay from lr to min_lr
    min_lr: float = 2.2e-5
    tail_lrs: list[float] = field(default_factory=lambda: [2.2e-5, 7.3e-6])  # constants after the decay
    tail_tokens: list[float] = field(default_factory=lambda: [3.33e11, 1.67e11])  # length of each constant
    # batch-size ramp: sequences per step grow linearly from batch_ramp_start to trainer.global_batch_size
    batch_ramp_start: int = 3072  # sequences per step at token 0; 0 = no ramp
    batch_ramp_tokens: float = 4.69e11  # tokens over which the batch size ramps
    # MTP loss weight lambda (paper 4.2): mtp_lambda until mtp_lambda_switch_tokens, then mtp_lambda_late
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_tokens: float = 1.0e13
    # aux-loss-free bias update speed gamma: bias_gamma until bias_gamma_stop_tokens, then 0
    bias_gamma: float = 1e-3
    bias_gamma_stop_tokens: float = 1.43e13

    def validate(self) -> OptimConfig:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2: must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.moment_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"optim.moment_dtype: bf16 or fp32, got {self.moment_dtype!r}")
        if len(self.tail_lrs) != len(self.tail_tokens):
            raise ConfigError(f"optim.tail_lrs has {len(self.tail_lrs)} entries but optim.tail_tokens "
                              f"{len(self.tail_tokens)}; give one token length per tail constant")
        for name in ("warmup_steps", "constant_tokens", "decay_tokens", "batch_ramp_start", "batch_ramp_tokens",
                     "weight_decay", "grad_clip", "eps", "bias_gamma", "mtp_lambda", "mtp_lambda_late"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        if any(x < 0 for x in self.tail_lrs + self.tail_tokens):
            raise ConfigError(f"optim.tail_lrs={self.tail_lrs}, optim.tail_tokens={self.tail_tokens}: must be >= 0")
        # A bf16 moment carries 8 significant bits: when a step changes it by a factor smaller than 2^-8 the
        # rounding puts it back, so with beta2 = 0.999 the second moment would stop decaying at all.
        if self.moment_dtype == "bf16" and min(1 - self.beta1, 1 - self.beta2) <= 2**-8:
            raise ConfigError(f"optim.moment_dtype=bf16 with optim.beta1={self.beta1}, optim.beta2={self.beta2}: "
                              "bf16 moments cannot follow a decay slower than 1 - 2^-8 per step; use betas <= 0.996 "
                              "or optim.moment_dtype=fp32")
        return self


# ---- AdamW ---------------------------------------------------------------------------------------------------

MOMENT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@torch.no_grad()
def adamw_update(master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                 cfg: OptimConfig, weight_decay: float) -> None:
    """One AdamW update of `master` (fp32) in place, with the moments updated in their storage dtype.

    `step` is this update's 1-based count (bias correction uses beta^step). The gradient is read in fp32 and left
    untouched. Bf16 moments are widened to fp32, updated, and rounded back into storage; the update itself uses
    the unrounded fp32 values. The operations and their order are those of torch.optim.AdamW (foreach=False),
    so with fp32 moments the result is bitwise the same. Every operation is elementwise: a flat shard may be
    updated in chunks (views) with a bitwise identical result, which bounds the fp32 temporaries.
    """
    if master.dtype != torch.float32:
        raise ValueError(f"adamw_update: the master weights must be fp32, got {master.dtype}")
    if step < 1:
        raise ValueError(f"adamw_update: step is the 1-based count of this update, got {step}")
    g = grad.float()
    m = exp_avg.float()  # the stored tensor itself when fp32, a widened copy when bf16
    v = exp_avg_sq.float()
    if weight_decay != 0:
        master.mul_(1 - lr * weight_decay)  # decoupled: master -= lr * wd * master
    m.lerp_(g, 1 - cfg.beta1)
    v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)
    bias_correction1 = 1 - cfg.beta1**step
    bias_correction2 = 1 - cfg.beta2**step
    denom = (v.sqrt() / bias_correction2**0.5).add_(cfg.eps)
    master.addcdiv_(m, denom, value=-lr / bias_correction1)


class AdamW:
    """AdamW over a model's parameters with fp32 master weights and bf16 or fp32 moments (paper 3.3).

    Hand-written because torch.optim.AdamW keeps the moments in the parameter's dtype and updates the parameter
    itself: with bf16 compute weights it would both lose every update smaller than half a bf16 ulp and keep
    bf16 moments computed in bf16. Here a non-fp32 parameter gets an fp32 master copy that takes the update and
    is then rounded into the parameter; an fp32 parameter is its own master. Weight decay applies to tensors
    with ndim >= 2 (matrices, embeddings), not to norm weights or other vectors. Parameters without a gradient
    are skipped, and each parameter counts its own steps, as in torch.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig):
        self.cfg = cfg.validate()
        self.params: dict[str, nn.Parameter] = {}
        self.masters: dict[str, Tensor] = {}  # only for non-fp32 parameters
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        self.steps: dict[str, int] = {}
        owner: dict[int, str] = {}
        for name, p in named_params:
            if not p.requires_grad:
                continue
            if name in self.params or id(p) in owner:
                raise ValueError(f"AdamW: parameter {name!r} given twice (or the same tensor as "
                                 f"{owner.get(id(p), name)!r}); pass model.named_parameters(), which deduplicates")
            if not p.is_floating_point():
                raise ValueError(f"AdamW: parameter {name!r} has dtype {p.dtype}; only float parameters train")
            owner[id(p)] = name
            self.params[name] = p
            if p.dtype != torch.float32:
                self.masters[name] = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
            moment_dtype = MOMENT_DTYPES[cfg.moment_dtype]
            self.exp_avg[name] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
            self.exp_avg_sq[name] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
            self.steps[name] = 0

    def master(self, name: str) -> Tensor:
        """The fp32 master of parameter `name`: its copy, or the parameter's own data when it is fp32."""
        return self.masters[name] if name in self.masters else self.params[name].detach()

    def master_params(self) -> Iterator[tuple[str, Tensor]]:
        """(name, fp32 master) for every trained parameter, for example for an EMA of the exact weights."""
        for name in self.params:
            yield name, self.master(name)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for name, p in self.params.items():
            grad = grad_of(p)
            if grad is None:
                continue
            self.steps[name] += 1
            master = self.master(name)
            weight_decay = self.cfg.weight_decay if p.ndim >= 2 else 0.0
            adamw_update(master, grad, self.exp_avg[name], self.exp_avg_sq[name], self.steps[name], lr, self.cfg,
                         weight_decay)
            if name in self.masters:
                p.copy_(master)  # round to nearest into the compute dtype

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor map (safetensors-ready): `master.<name>` (non-fp32 parameters only),
        `exp_avg.<name>`, `exp_avg_sq.<name>` and `step.<name>` (0-d int64). The tensors are the live state,
        not copies: save them before the next step."""
        out: dict[str, Tensor] = {}
        for name in self.params:
            if name in self.masters:
                out[f"master.{name}"] = self.masters[name]
            out[f"exp_avg.{name}"] = self.exp_avg[name]
            out[f"exp_avg_sq.{name}"] = self.exp_avg_sq[name]
            out[f"step.{name}"] = torch.tensor(self.steps[name], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a `state_dict()`, then round each master into its parameter so that resuming is bitwise exact.
        Every name and shape is checked before anything is written. Moments saved in another dtype are cast."""
        expected = {key: t.shape for key, t in self.state_dict().items()}
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        mismatched = [f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key])})"
                      for key in sorted(expected.keys() & state.keys()) if state[key].shape != expected[key]]
        if missing or unexpected or mismatched:
            raise ValueError("optimizer state does not fit this model: " + "; ".join(
                f"{label} {_listing(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if names)
                + ". It was saved for another model config or trainer.dtype (master.* entries exist only for "
                "non-fp32 parameters); resume with the config it was written with")
        for name, p in self.params.items():
            if name in self.masters:
                self.masters[name].copy_(state[f"master.{name}"])
                p.copy_(self.masters[name])
            self.exp_avg[name].copy_(state[f"exp_avg.{name}"])
            self.exp_avg_sq[name].copy_(state[f"exp_avg_sq.{name}"])
            self.steps[name] = int(state[f"step.{name}"])


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"


# ---- gradient clipping ---------------------------------------------------------------------------------------


def grad_norm_sq(grads: Iterable[Tensor]) -> Tensor:
    """Sum of squares of `grads` in fp32, a 0-d tensor on the first gradient's device (CPU when there is none).
    A ZeRO rank computes it over its local gradient shards and all-reduces it before the square root."""
    squares = [torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads]
    if not squares:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([s.to(squares[0].device) for s in squares]).sum()


def attach_main_grads(params: Iterable[nn.Parameter]) -> None:
    """Accumulate the gradients of low-precision parameters into an fp32 `main_grad` (paper 3.3: weight
    gradients are kept in FP32), so that micro-batch accumulation does not round in bf16. After each
    backward the hook adds `p.grad` into `p.main_grad` and frees `p.grad`; the optimizer and the clip read
    `main_grad` through `grad_of`."""

    def move(p: nn.Parameter) -> None:
        if p.grad is None:  # autograd also runs the hook when a deferred W left no gradient (fp8/linear.py)
            return
        if p.main_grad is None:
            p.main_grad = p.grad.float()
        else:
            p.main_grad.add_(p.grad)
        p.grad = None

    for p in params:
        if p.dtype != torch.float32 and not hasattr(p, "main_grad"):
            p.main_grad = None
            p.register_post_accumulate_grad_hook(move)


def grad_of(p: Tensor) -> Tensor | None:
    """The gradient the optimizer uses: the fp32 `main_grad` when the parameter has one, else `p.grad`."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Global L2 norm of the parameters' gradients in fp32 (0-d), returned as it was before clipping.

    When the norm exceeds `max_norm`, the gradients are scaled in place by max_norm / (norm + 1e-6), as in
    torch.nn.utils.clip_grad_norm_. A non-finite norm leaves the gradients untouched, so that the caller can
    skip the step or stop. max_norm = 0 only computes the norm.
    """
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    grads = [g for g in map(grad_of, params) if g is not None]
    norm = grad_norm_sq(grads).sqrt()
    # One host sync per step; the trainer reads the norm anyway.
    if max_norm > 0 and torch.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale.to(g.device))
    return norm


# ---- schedules (paper 4.2) -----------------------------------------------------------------------------------


def lr_at(cfg: OptimConfig, step: int, tokens: float) -> float:
    """Learning rate of optimizer step `step` (0-based), taken after `tokens` training tokens.

    The paper: warm-up to 2.2e-4 over 2K steps; constant until 10T tokens; cosine decay to 2.2e-5 over 4.3T
    tokens; then 2.2e-5 for 333B and 7.3e-6 for the last 167B of the 14.8T tokens.
      1. warm-up, by steps: lr * (step + 1) / warmup_steps, so the last warm-up step already uses the peak lr;
         it takes precedence over the token phases when both apply;
      2. constant lr while tokens < constant_tokens;
      3. cosine from lr to min_lr over the next decay_tokens;
      4. tail_lrs[i] for tail_tokens[i] tokens each, in turn;
      5. the last tail value (min_lr when there are no tails) forever after.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if tokens < cfg.constant_tokens:
        return cfg.lr
    end = cfg.constant_tokens + cfg.decay_tokens
    if tokens < end:
        progress = (tokens - cfg.constant_tokens) / cfg.decay_tokens
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    for tail_lr, tail_tokens in zip(cfg.tail_lrs, cfg.tail_tokens):
        end += tail_tokens
        if tokens < end:
            return tail_lr
    return cfg.tail_lrs[-1] if cfg.tail_lrs else cfg.min_lr


def batch_size_at(cfg: OptimConfig, tokens: float, final: int, granularity: int) -> int:
    """Sequences in the optimizer step taken after `tokens` training tokens.

    The paper ramps 3072 -> 15360 sequences over the first 469B tokens, then holds 15360. The ramp is linear in
    tokens and rounded down to a multiple of `granularity` (micro_batch_size x data-parallel size: a step grows by
    whole micro-batches), within [granularity, final]. batch_ramp_start = 0 or batch_ramp_tokens = 0: always
    `final` (trainer.global_batch_size).
    """
    if granularity < 1 or final % granularity:
        raise ValueError(f"trainer.global_batch_size={final} must be a positive multiple of micro_batch_size x "
                         f"data-parallel size = {granularity}")
    if cfg.batch_ramp_start == 0 or cfg.batch_ramp_tokens == 0:
        return final
    if cfg.batch_ramp_start > final:
        raise ValueError(f"optim.batch_ramp_start={cfg.batch_ramp_start} exceeds trainer.global_batch_size={final}; "
                         "lower it, or set optim.batch_ramp_start=0 for a constant batch size")
    if tokens >= cfg.batch_ramp_tokens:
        return final
    size = cfg.batch_ramp_start + (final - cfg.batch_ramp_start) * tokens / cfg.batch_ramp_tokens
    return min(final, max(granularity, int(size) // granularity * granularity))


def mtp_lambda_at(cfg: OptimConfig, tokens: float) -> float:
    """MTP loss weight: 0.3 for the first 10T tokens, then 0.1 (paper 4.2)."""
    return cfg.mtp_lambda if tokens < cfg.mtp_lambda_switch_tokens else cfg.mtp_lambda_late


def bias_gamma_at(cfg: OptimConfig, tokens: float) -> float:
    """Bias update speed of aux-loss-free balancing: 0.001 for the first 14.3T tokens, then 0 (paper 4.2)."""
    return cfg.bias_gamma if tokens < cfg.bias_gamma_stop_tokens else 0.0
