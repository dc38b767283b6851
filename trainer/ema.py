"""Exponential moving average of the model's parameters, kept in fp32 on the CPU (paper 3.2.3).

The paper keeps the EMA in CPU memory and updates it asynchronously after each training step, so that it
costs neither GPU memory nor step time. Here `update` does only what must happen before the optimizer
touches the weights again: it snapshots the parameters into a reusable CPU buffer (on a GPU: a copy to
pinned memory on a side stream, which the compute stream waits for before its next kernel). The
average itself, `ema = decay * ema + (1 - decay) * param`, runs on one background thread (torch releases the
GIL in its kernels), overlapping the next step's forward. One update is in flight at most, which bounds
memory to one snapshot; `wait()` joins it and every reader (`state_dict`, `copy_to`) waits first.

Under ZeRO-1 a rank keeps only the ranges of the parameters its optimizer shard owns (`Optimizer.owned()`, the
ranges it also writes to checkpoints, trainer/shards.py), so the EMA costs each rank about 1/DP of a full fp32
copy; in one process (AdamW owns everything) it keeps everything. The whole average exists only in a checkpoint,
as the pieces of all ranks (hai-export --ema assembles it).

Only parameters are averaged; buffers such as the router biases are not (an export takes them from the
model's own weights).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


class EMA:
    """fp32 CPU shadow of the floating-point parameters of a model, named as in `model.named_parameters()`.

    `owned`: name -> the range [start, end) of the flattened parameter this rank keeps (`Optimizer.owned()`);
    parameters it does not name are not kept. None keeps every parameter whole. `shadow[name]` holds the kept
    elements, flat."""

    def __init__(self, model: nn.Module, decay: float, owned: dict[str, tuple[int, int]] | None = None) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay} (trainer.ema_decay)")
        self.decay = decay
        params = _params(model)
        self._names = frozenset(params)  # the model's, of which update() checks every later model
        self.shapes = {n: p.shape for n, p in params.items() if owned is None or n in owned}
        self.ranges = {n: (0, p.numel()) if owned is None else owned[n] for n, p in params.items() if n in self.shapes}
        kept = self._kept(params)
        self.shadow = {n: t.to("cpu", torch.float32, copy=True) for n, t in kept.items()}
        pin = torch.cuda.is_available() and any(p.is_cuda for p in params.values())
        self._snapshot = {n: torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                          for n, t in kept.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Future | None = None
        self._stream: torch.cuda.Stream | None = None  # side stream of the device-to-host copies

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (call after each optimizer step)."""
        self.wait()  # the previous average has read the snapshot buffer, which is reused now
        params = _params(model)
        if params.keys() != self._names:
            raise KeyError(f"EMA update: the model's parameters differ from the EMA's: "
                           f"{_diff(params, dict.fromkeys(self._names))}")
        copied = self._copy_to_snapshot(self._kept(params))
        self._pending = self._pool.submit(self._average, copied)

    def wait(self) -> None:
        """Block until the update in flight (if any) is applied; re-raises an error of the worker."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    @property
    def whole(self) -> bool:
        """Whether every kept parameter is kept whole (one process)."""
        return all(self.ranges[n] == (0, s.numel()) for n, s in self.shapes.items())

    def nbytes(self) -> int:
        """Bytes of the average this rank keeps."""
        return sum(t.nbytes for t in self.shadow.values())

    def pieces(self) -> dict[str, tuple[int, torch.Tensor]]:
        """The kept elements as (start, the live flat fp32 tensor of elements [start, end)), per parameter: the
        form of `Optimizer.shards()`."""
        self.wait()
        return {n: (self.ranges[n][0], t) for n, t in self.shadow.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept parameters in their shapes (fp32, CPU): the live tensors where a parameter is kept whole (copy
        them before changing them), else a fresh tensor that is NaN outside the kept range."""
        self.wait()
        out = {}
        for name, shape in self.shapes.items():
            a, z = self.ranges[name]
            if (a, z) == (0, shape.numel()):
                out[name] = self.shadow[name].view(shape)
            else:
                full = torch.full((shape.numel(),), math.nan, dtype=torch.float32, device="cpu")
                full[a:z] = self.shadow[name]
                out[name] = full.view(shape)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load parameter-shaped tensors (e.g. read from a checkpoint of any layout), keeping this rank's ranges."""
        self.wait()
        if state.keys() != self.shapes.keys():
            raise KeyError(f"EMA state does not match the model's parameters: {_diff(state, self.shapes)}")
        for name, tensor in state.items():
            if tensor.shape != self.shapes[name]:
                raise ValueError(f"EMA state {name}: shape {tuple(tensor.shape)}, the model has "
                                 f"{tuple(self.shapes[name])}")
            a, z = self.ranges[name]
            self.shadow[name].copy_(tensor.reshape(-1)[a:z])

    def load_pieces(self, pieces: dict[str, torch.Tensor]) -> None:
        """Load the kept elements of every kept parameter (flat, as `pieces()` gives them), e.g. read from a
        checkpoint of any layout (trainer/shards.py: `Shards.load_ema`)."""
        self.wait()
        if pieces.keys() != self.shapes.keys():
            raise KeyError(f"EMA state does not match the model's parameters: {_diff(pieces, self.shapes)}")
        for name, flat in pieces.items():
            self.shadow[name].copy_(flat.reshape(-1))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the average (cast to each parameter's dtype and device); only an
        EMA that keeps every parameter whole can."""
        self.wait()
        if not self.whole or self.shapes.keys() != _params(model).keys():
            raise ValueError("EMA.copy_to: this rank keeps only its ZeRO-1 ranges of the average; assemble the "
                             "whole EMA from a checkpoint (hai-export --ema)")
        for name, param in _params(model).items():
            param.copy_(self.shadow[name].view(param.shape))

    def _kept(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The kept elements of each kept parameter, as flat views."""
        return {n: params[n].detach().reshape(-1)[a:z] for n, (a, z) in self.ranges.items()}

    def _copy_to_snapshot(self, params: dict[str, torch.Tensor]) -> torch.cuda.Event | None:
        cuda = [p for p in params.values() if p.is_cuda]
        if not cuda:
            for name, p in params.items():
                self._snapshot[name].copy_(p)
            return None
        device = cuda[0].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream, compute = self._stream, torch.cuda.current_stream(device)
        stream.wait_stream(compute)  # copy the weights the optimizer has just written
        with torch.cuda.stream(stream):
            for name, p in params.items():
                self._snapshot[name].copy_(p, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        compute.wait_event(done)  # the next optimizer step must not overwrite a weight before it is copied
        return done

    def _average(self, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        for name, ema in self.shadow.items():
            ema.mul_(self.decay).add_(self._snapshot[name], alpha=1 - self.decay)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


def _diff(got: dict, want: dict) -> str:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    return f"missing {missing[:10]}, unexpected {extra[:10]}"
