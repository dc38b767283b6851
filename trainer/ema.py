"""Exponential moving average of the model's parameters, kept in fp32 on the CPU (paper 3.2.3).

The paper keeps the EMA in CPU memory and updates it asynchronously after each training step, so that it
costs neither GPU memory nor step time. Here `update` does only what must happen before the optimizer
touches the weights again: it snapshots the parameters into a reusable CPU buffer (on a GPU: a copy to
pinned memory on a side stream, which the compute stream waits for before its next kernel). The
average itself, `ema = decay * ema + (1 - decay) * param`, runs on one background thread (torch releases the
GIL in its kernels), overlapping the next step's forward. One update is in flight at most, which bounds
memory to one snapshot; `wait()` joins it and every reader (`state_dict`, `copy_to`) waits first.

Only parameters are averaged; buffers such as the router biases are not (an export takes them from the
model's own weights).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


class EMA:
    """fp32 CPU shadow of every floating-point parameter of a model, named as in `model.named_parameters()`."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay} (trainer.ema_decay)")
        self.decay = decay
        params = _params(model)
        self.shadow = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}
        pin = torch.cuda.is_available() and any(p.is_cuda for p in params.values())
        self._snapshot = {n: torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                          for n, p in params.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Future | None = None
        self._stream: torch.cuda.Stream | None = None  # side stream of the device-to-host copies

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (call after each optimizer step)."""
        self.wait()  # the previous average has read the snapshot buffer, which is reused now
        params = _params(model)
        if params.keys() != self.shadow.keys():
            raise KeyError(f"EMA update: the model's parameters differ from the EMA's: {_diff(params, self.shadow)}")
        copied = self._copy_to_snapshot(params)
        self._pending = self._pool.submit(self._average, copied)

    def wait(self) -> None:
        """Block until the update in flight (if any) is applied; re-raises an error of the worker."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters (fp32, CPU): the live tensors, so copy them before changing them."""
        self.wait()
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait()
        if state.keys() != self.shadow.keys():
            raise KeyError(f"EMA state does not match the model's parameters: {_diff(state, self.shadow)}")
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name}: shape {tuple(tensor.shape)}, the model has "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the average (cast to each parameter's dtype and device)."""
        self.wait()
        for name, param in _params(model).items():
            param.copy_(self.shadow[name])

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
