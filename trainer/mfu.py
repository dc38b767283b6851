"""Model FLOP/s per device and MFU for the metrics records (`tflops_per_device`, `mfu`).

Model FLOPs come from the one analytic count, `model.flops.flops_per_token` (forward + backward, recompute not
counted): profilers count zero FLOPs for grouped expert GEMMs, so a count from the shapes is the one to trust.
Per device = model FLOPs of the step's tokens / step time / world size: every rank of the grid shares the step's
work (pipeline stages split the layers, expert parallelism the experts, DP the batch).

The peak that MFU divides by, in this order:
1. `trainer.peak_tflops` when set (for a GPU the table below lacks, or another convention);
2. on CUDA, the dense BF16 tensor-core peak of the GPU named by NVML (torch's device name without nvidia-ml-py),
   from `GPU_PEAK_TFLOPS_BF16` (vendor datasheets, dense, no sparsity). MFU is quoted against the BF16 peak also
   when the FP8 recipe is on (its FP8 GEMMs may then push MFU past what BF16 alone allows), the convention of
   Megatron's and torchtitan's reports;
3. on the CPU, this rank's GEMM peak measured once at start-up: a square matmul in the compute dtype (the best of
   a few), timed on every rank at the same moment so that ranks sharing cores measure the share they really get.
An unknown GPU without `trainer.peak_tflops` gives `mfu: null` and one line saying how to set it.
"""

from __future__ import annotations

import re
import time

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.flops import flops_per_token
from trainer.metrics import GpuMonitor

# dense BF16 tensor-core TFLOP/s per GPU; the most specific names first (a name is matched as a whole word)
GPU_PEAK_TFLOPS_BF16 = (
    ("H100 PCIe", 756.0), ("H800 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("H100", 989.4), ("H800", 989.4), ("H20", 148.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.1), ("L4", 121.0),
)
CPU_GEMM_N = 1024  # the measured matmul: 2 N^3 FLOPs, large enough for this CPU's GEMM kernel to reach its peak
CPU_GEMM_REPEATS = 5  # the best of them: a peak, robust to a moment of load


def gpu_peak_tflops(name: str) -> float | None:
    """The dense BF16 peak of the GPU called `name` (e.g. "NVIDIA H800"), or None when the table lacks it."""
    for key, tflops in GPU_PEAK_TFLOPS_BF16:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return tflops
    return None


def gpu_name(device: torch.device) -> str:
    """The GPU's name from NVML (GpuMonitor: the handle found by the device's UUID), else torch's."""
    monitor = GpuMonitor.create()
    try:
        return monitor.name() if monitor is not None else torch.cuda.get_device_name(device)
    except Exception:  # an NVML error: torch knows the name too
        return torch.cuda.get_device_name(device)


def measure_cpu_peak(dtype: torch.dtype, n: int = CPU_GEMM_N) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on this CPU (the best of a few after one warm-up), timed by every
    rank at once, after a barrier, so that ranks sharing cores measure their share; the ranks' mean."""
    a = torch.randn(n, n, device="cpu").to(dtype)
    b = torch.randn(n, n, device="cpu").to(dtype)
    ranks = dist.is_initialized()
    if ranks:
        dist.barrier()
    a @ b
    times = []
    for _ in range(CPU_GEMM_REPEATS):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    peak = torch.tensor([2 * n**3 / min(times)], dtype=torch.float64, device="cpu")
    if ranks:
        dist.all_reduce(peak)
        peak /= dist.get_world_size()
    return float(peak)


class Throughput:
    """A run's model FLOPs per token and the peak MFU divides by; `record` gives a step's two metrics."""

    def __init__(self, model: ModelConfig, seq_len: int, world_size: int, peak_flops: float | None,
                 source: str) -> None:
        self.flops_per_token = flops_per_token(model, seq_len)
        self.world_size = world_size
        self.peak_flops = peak_flops  # FLOP/s per device, None = unknown
        self.source = source  # where the peak came from, for the start-up line

    @classmethod
    def for_run(cls, model: ModelConfig, seq_len: int, world_size: int, peak_tflops: float | None,
                device: torch.device, dtype: torch.dtype) -> Throughput:
        """The peak by the module docstring's rule for this rank's `device` and compute `dtype`."""
        if peak_tflops is not None:
            peak, source = peak_tflops * 1e12, f"trainer.peak_tflops={peak_tflops:g}"
        elif device.type == "cuda":
            name = gpu_name(device)
            tflops = gpu_peak_tflops(name)
            peak = None if tflops is None else tflops * 1e12
            source = (f"{name}: dense BF16 peak {tflops:g} TFLOP/s" if tflops is not None else
                      f"{name} is not in trainer/mfu.py's GPU table: mfu is null; set trainer.peak_tflops=<its "
                      "dense BF16 TFLOP/s>")
        else:
            peak = measure_cpu_peak(dtype)
            source = f"measured CPU GEMM peak {peak / 1e9:.1f} GFLOP/s ({CPU_GEMM_N}^3, {dtype})"
        return cls(model, seq_len, world_size, peak, source)

    def record(self, tokens_per_s: float) -> dict[str, float | None]:
        """{"tflops_per_device": model TFLOP/s per device at `tokens_per_s` (the whole grid's), "mfu": its share
        of the peak (None when the peak is unknown)}."""
        flops = self.flops_per_token * tokens_per_s / self.world_size
        return {"tflops_per_device": flops / 1e12,
                "mfu": None if self.peak_flops is None else flops / self.peak_flops}

    def line(self) -> str:
        return (f"model FLOPs {self.flops_per_token / 1e9:.4g} GFLOP per token (model/flops.py, forward + backward); "
                f"MFU against {self.source}")


__all__ = ["GPU_PEAK_TFLOPS_BF16", "Throughput", "gpu_peak_tflops", "measure_cpu_peak"]
