"""The one optimizer interface of the training loop (DESIGN.md principle 5), which the single-process AdamW
(optim/adamw.py) and ZeRO-1 (parallel/zero.py) both implement, with what they share: the parameter collection,
the state-key check and the gradient norm.

    grad_norm()              the global L2 norm of the gradients (fp32, 0-d); collective under ZeRO
    step(lr, max_norm=0)     norm, clip at max_norm (0: no clip), AdamW update; returns the norm before clipping,
                             and a non-finite norm leaves parameters and state untouched
    zero_grad()              drop the gradients (and anything derived from them)
    owned() / shards() / load_shards(shapes, read)
                             the state as ranges of each parameter's flattened tensors under AdamW's keys
                             (`master.<name>` for non-fp32 parameters, `exp_avg.<name>`, `exp_avg_sq.<name>`,
                             `step.<name>`), so that trainer/shards.py writes and reads checkpoints the same way for
                             one process and for any ZeRO layout
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from model.grads import grad_of
from optim.config import OptimConfig

ShapeOf = dict[str, torch.Size]
Read = Callable[[str, int, int], Tensor]  # (key, start, end) -> elements [start, end) of the flattened entry


class Optimizer(ABC):
    """Base of AdamW and ZeroOptimizer: `params` are the trained parameters by name (see the module docstring);
    `cfg` is a validated OptimConfig (RunConfig.validate, or its own `validate()`)."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> None:
        self.cfg = cfg
        self.params = collect_params(named_params, type(self).__name__)

    @abstractmethod
    def grad_norm(self) -> Tensor: ...

    @abstractmethod
    def step(self, lr: float, max_norm: float = 0.0) -> float: ...

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None

    @abstractmethod
    def owned(self) -> dict[str, tuple[int, int]]:
        """name -> the range [start, end) of the flattened parameter whose state this rank holds."""

    @abstractmethod
    def shards(self) -> dict[str, tuple[int, Tensor]]:
        """This rank's state under AdamW's keys, each as (start, 1-D copy of its elements from start on)."""

    @abstractmethod
    def load_shards(self, shapes: ShapeOf, read: Read) -> None:
        """Load state saved by any layout: `shapes` gives every saved key's (local) shape, `read` its elements."""

    def state_shapes(self) -> ShapeOf:
        """The keys and shapes of the whole state of `params` (what `load_shards` expects)."""
        out: ShapeOf = {}
        for name, p in self.params.items():
            if p.dtype != torch.float32:
                out[f"master.{name}"] = p.shape
            out[f"exp_avg.{name}"] = p.shape
            out[f"exp_avg_sq.{name}"] = p.shape
            out[f"step.{name}"] = torch.Size([])
        return out

    def check_state(self, given: ShapeOf) -> None:
        """Raise a ValueError naming the missing, unexpected and mis-shaped keys of a state to be loaded."""
        expected = self.state_shapes()
        given = {k: torch.Size(s) for k, s in given.items()}
        missing = sorted(expected.keys() - given.keys())
        unexpected = sorted(given.keys() - expected.keys())
        mismatched = [f"{key} {tuple(given[key])} (expected {tuple(expected[key])})"
                      for key in sorted(expected.keys() & given.keys()) if given[key] != expected[key]]
        if missing or unexpected or mismatched:
            raise ValueError("optimizer state does not fit this model: " + "; ".join(
                f"{label} {_listing(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if names)
                + ". It was saved for another model config or trainer.dtype (master.* entries exist only for "
                "non-fp32 parameters), or expert entries for another expert-parallel size; resume with the config "
                "it was written with")


def collect_params(named_params: Iterable[tuple[str, nn.Parameter]], who: str) -> dict[str, nn.Parameter]:
    """The parameters that train (requires_grad), by name; each tensor once, floating point."""
    params: dict[str, nn.Parameter] = {}
    owner: dict[int, str] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if name in params or id(p) in owner:
            raise ValueError(f"{who}: parameter {name!r} given twice (or the same tensor as "
                             f"{owner.get(id(p), name)!r}); pass model.named_parameters(), which deduplicates")
        if not p.is_floating_point():
            raise ValueError(f"{who}: parameter {name!r} has dtype {p.dtype}; only float parameters train")
        owner[id(p)] = name
        params[name] = p
    return params


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"


def grad_norm_sq(grads: Iterable[Tensor]) -> Tensor:
    """Sum of squares of `grads` in fp32, a 0-d tensor on the first gradient's device (CPU when there is none).
    A ZeRO rank computes it over its local gradient shards and all-reduces it before the square root."""
    squares = [torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads]
    if not squares:
        return torch.zeros((), dtype=torch.float32, device="cpu")
    return torch.stack([s.to(squares[0].device) for s in squares]).sum()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Global L2 norm of the parameters' gradients (`grad_of`) in fp32 (0-d), returned as it was before clipping.

    With max_norm > 0 the gradients are scaled in place by min(1, max_norm / (norm + 1e-6)), as
    torch.nn.utils.clip_grad_norm_ does, on the device (no host sync); a non-finite norm leaves them untouched, so
    that the caller can skip the step or stop. max_norm = 0 only computes the norm.
    """
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    grads = [g for g in map(grad_of, params) if g is not None]
    norm = grad_norm_sq(grads).sqrt()
    if max_norm > 0 and grads:
        scale_grads_(grads, norm, max_norm)
    return norm


def scale_grads_(grads: Iterable[Tensor], norm: Tensor, max_norm: float) -> None:
    """The clip: multiply by min(1, max_norm / (norm + 1e-6)), or by 1 when the norm is not finite; on the device.
    A factor of exactly 1 leaves a gradient bitwise as it was."""
    scale = torch.where(torch.isfinite(norm), (max_norm / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    for g in grads:
        g.mul_(scale.to(g.device))
