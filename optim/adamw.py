"""AdamW over fp32 master weights with bf16 or fp32 moments (paper 3.3, "Storage"): the update arithmetic on one
tensor (`adamw_update`, which ZeRO-1 in parallel/zero.py runs on flat shards) and the single-process optimizer
(`AdamW`, the reference every parallel layout is compared with)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from core.config import torch_dtype
from model.grads import grad_of
from optim.config import OptimConfig
from optim.optimizer import Optimizer, Read, ShapeOf, clip_grad_norm_


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


def weight_decay_of(p: Tensor, cfg: OptimConfig) -> float:
    """Decoupled weight decay applies to matrices and embeddings (ndim >= 2), not to norms or other vectors."""
    return cfg.weight_decay if p.ndim >= 2 else 0.0


def param_groups(params: Iterable[Tensor], cfg: OptimConfig) -> list[dict]:
    """`weight_decay_of` as two parameter groups (decayed, not) for optimizers that take torch's groups, such as
    torch.optim.AdamW or DeepSpeed's (the ZeRO-1 comparisons in tests/dist/test_zero_peers.py, bench/zero_peers.py)."""
    params = list(params)
    return [{"params": [p for p in params if weight_decay_of(p, cfg) > 0], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if weight_decay_of(p, cfg) == 0], "weight_decay": 0.0}]


class AdamW(Optimizer):
    """AdamW over a model's parameters with fp32 master weights and bf16 or fp32 moments (paper 3.3).

    Hand-written because torch.optim.AdamW keeps the moments in the parameter's dtype and updates the parameter
    itself: with bf16 compute weights it would both lose every update smaller than half a bf16 ulp and keep
    bf16 moments computed in bf16. Here a non-fp32 parameter gets an fp32 master copy that takes the update and
    is then rounded into the parameter; an fp32 parameter is its own master. Parameters without a gradient are
    skipped, and each parameter counts its own steps, as in torch.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> None:
        super().__init__(named_params, cfg)
        moment_dtype = torch_dtype(self.cfg.moment_dtype)
        self.masters: dict[str, Tensor] = {}  # only for non-fp32 parameters
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        self.steps: dict[str, int] = {}
        for name, p in self.params.items():
            if p.dtype != torch.float32:
                self.masters[name] = p.detach().to(torch.float32, memory_format=torch.contiguous_format)
            self.exp_avg[name] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
            self.exp_avg_sq[name] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
            self.steps[name] = 0

    def master(self, name: str) -> Tensor:
        """The fp32 master of parameter `name`: its copy, or the parameter's own data when it is fp32."""
        return self.masters[name] if name in self.masters else self.params[name].detach()

    def grad_norm(self) -> Tensor:
        return clip_grad_norm_(self.params.values(), 0.0)

    @torch.no_grad()
    def step(self, lr: float, max_norm: float = 0.0) -> float:
        norm = float(clip_grad_norm_(self.params.values(), max_norm))  # the step's one host sync
        if not math.isfinite(norm):
            return norm
        for name, p in self.params.items():
            grad = grad_of(p)
            if grad is None:
                continue
            self.steps[name] += 1
            master = self.master(name)
            adamw_update(master, grad, self.exp_avg[name], self.exp_avg_sq[name], self.steps[name], lr, self.cfg,
                         weight_decay_of(p, self.cfg))
            if name in self.masters:
                p.copy_(master)  # round to nearest into the compute dtype
        return norm

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor map (safetensors-ready) under the keys of optim/optimizer.py; `step.<name>` is 0-d
        int64. The tensors are the live state, not copies: save them before the next step."""
        out: dict[str, Tensor] = {}
        for name in self.params:
            if name in self.masters:
                out[f"master.{name}"] = self.masters[name]
            out[f"exp_avg.{name}"] = self.exp_avg[name]
            out[f"exp_avg_sq.{name}"] = self.exp_avg_sq[name]
            out[f"step.{name}"] = torch.tensor(self.steps[name], dtype=torch.int64, device="cpu")
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a `state_dict()`, then round each master into its parameter so that resuming is bitwise exact.
        Every name and shape is checked before anything is written. Moments saved in another dtype are cast."""
        self.check_state({key: t.shape for key, t in state.items()})
        for name, p in self.params.items():
            if name in self.masters:
                self.masters[name].copy_(state[f"master.{name}"])
                p.copy_(self.masters[name])
            self.exp_avg[name].copy_(state[f"exp_avg.{name}"])
            self.exp_avg_sq[name].copy_(state[f"exp_avg_sq.{name}"])
            self.steps[name] = int(state[f"step.{name}"])

    # one process holds the whole state: every range is the whole tensor
    def owned(self) -> dict[str, tuple[int, int]]:
        return {name: (0, p.numel()) for name, p in self.params.items()}

    def shards(self) -> dict[str, tuple[int, Tensor]]:
        return {key: (0, t.reshape(-1)) for key, t in self.state_dict().items()}

    def load_shards(self, shapes: ShapeOf, read: Read) -> None:
        self.check_state(shapes)
        self.load_state_dict({key: read(key, 0, shape.numel()).view(shape) for key, shape in
                              ((k, torch.Size(s)) for k, s in shapes.items())})
