"""Initialisation keyed by parameter name, so that a rank can build only what it owns (paper 4.2: every weight
matrix and the embedding normal with std `init_std`; norms one; router biases zero).

Each weight is drawn from its own generator, seeded from (run seed, the parameter's global name), and each
routed expert's slice of a `GroupedLinear` from (run seed, name, global expert index). The values a rank gets
therefore depend on nothing but the names it holds: a pipeline stage, an expert-parallel block of experts or
DualPipe's mirror copy initialised on its own equals the same tensors of the whole model built in one process,
and a rank never has to build (or even allocate) the rest of the model. That is what lets the trainer build the
model on the meta device, cut it to this rank's part, and only then `materialize` it on the rank's device.

The draws happen on the parameter's device with a generator of that device: on the CPU every layout starts from
bitwise the single-process weights (tested); a CUDA run starts from other values than a CPU run of the same seed
(another random-number algorithm), but again the same ones in every layout.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from model.linear import GroupedLinear, Linear
from model.norm import RMSNorm
from model.rope import rope_tables

ZERO_BUFFERS = ("bias", "tokens_per_expert")  # the router's state (model/moe.py: Gate)
TABLES = ("rope_cos", "rope_sin")  # computed from the config (model/rope.py)


def param_seed(seed: int, name: str, expert: int | None = None) -> int:
    """The seed of one parameter (or of one expert's slice of it): a 63-bit hash of the run seed and the name."""
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _normal(t: torch.Tensor, std: float, seed: int) -> None:
    g = torch.Generator(device=t.device).manual_seed(seed)
    t.normal_(0.0, std, generator=g)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float) -> None:
    """Initialise every parameter and buffer of `model` (a `model.Transformer` or any part of one; names are
    global) as the module docstring says. A GroupedLinear holding experts [first_expert, first_expert + E) seeds
    slice i with global expert index first_expert + i. A parameter of a kind this does not know is an error, so
    a new module cannot silently keep its constructor's values."""
    for prefix, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if isinstance(module, GroupedLinear):
                for i in range(p.shape[0]):
                    _normal(p[i], std, param_seed(seed, name, module.first_expert + i))
            elif isinstance(module, (Linear, nn.Embedding)):
                _normal(p, std, param_seed(seed, name))
            elif isinstance(module, RMSNorm):
                p.fill_(1.0)
            else:
                raise TypeError(f"init_parameters: no rule for {name} of {type(module).__name__}; add one to "
                                "model/init.py")
        for bname, b in module.named_buffers(recurse=False):
            if bname in ZERO_BUFFERS:
                b.zero_()
            elif bname not in TABLES:
                raise TypeError(f"init_parameters: no rule for the buffer {prefix}.{bname}; add one to model/init.py")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(model, "rope_cos"):
        model.rope_cos, model.rope_sin = rope_tables(cfg, model.rope_cos.device)


def materialize(model: nn.Module, device: torch.device | str, seed: int, std: float) -> nn.Module:
    """Allocate a model built on the meta device (only the part this rank kept) on `device`, in the dtypes it
    was built with, and initialise it (`init_parameters`); returns the model. On "meta" (a dry run) the model
    stays shapes only."""
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    init_parameters(model, seed, std)
    return model
