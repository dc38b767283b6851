"""Counting the calls that would make the host wait for a CUDA device (a "host sync"), on any device.

On CUDA, kernels run asynchronously; a call that needs a value on the host (`item`, `tolist`, `bool(t)`, `int(t)`,
`.cpu()`) or an output size that only the device knows (`nonzero`, `bincount`, `unique`, `masked_select`,
`repeat_interleave` with tensor repeats and no `output_size`) stalls the host until every queued kernel has run.
Gloo on the CPU never shows these stalls, so `HostSyncCounter` (a TorchFunctionMode) counts such calls whatever
the device: a CPU test can assert a budget that holds on the GPU (tests/unit/test_host_syncs.py,
tests/dist/test_devices.py), and bench/host_syncs.py reports them per step and per MoE layer. A call made inside
another torch call is not counted twice (the mode is off while its handler runs).

Copies from the host to the device (`.to("cuda")` of a pageable tensor) block too; they are counted as `to_device`
unless `non_blocking=True`.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SYNCING = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "nonzero",
                     "argwhere", "bincount", "unique", "unique_consecutive", "masked_select", "cpu", "numpy",
                     "equal", "allclose"})


def _to_kind(args: tuple, kwargs: dict) -> str | None:
    """'to_host' for `.to(<cpu>)` of a non-CPU tensor, 'to_device' for a blocking copy to a device; else None."""
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            target = a
        elif isinstance(a, torch.Tensor):
            target = a.device
    if src is None or target is None:
        return None
    target = torch.device(target)
    if target.type == "cpu" and src.device.type not in ("cpu", "meta"):
        return "to_host"
    if target.type not in ("cpu", "meta") and src.device.type == "cpu" and not kwargs.get("non_blocking", False):
        return "to_device"
    return None


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as c: ...` counts, by call name, the torch calls of the block that sync on CUDA
    (`c.counts`, `c.total`); with `where=True` also by the first caller outside torch (`c.sites`: "file:line")."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._where = where

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = None
        if name in SYNCING:
            kind = name
        elif name == "to":
            kind = _to_kind(args, kwargs)
        elif name == "repeat_interleave" and "output_size" not in kwargs and _tensor_repeats(args, kwargs):
            kind = name
        if kind is not None:
            self.counts[kind] += 1
            if self._where:
                self.sites[_caller()] += 1
        return func(*args, **kwargs)


def _tensor_repeats(args: tuple, kwargs: dict) -> bool:
    """repeat_interleave sizes its output from the device only when the repeats are a tensor (or it is the
    one-argument form, whose input is the repeats)."""
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
    return repeats is None or isinstance(repeats, torch.Tensor)


def _caller() -> str:
    """The innermost frame outside torch and this module, as "path:line (function)"."""
    here = __file__
    for frame in reversed(traceback.extract_stack(sys._getframe(2))):
        if frame.filename != here and "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"
