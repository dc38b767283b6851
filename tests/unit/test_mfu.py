"""trainer/mfu.py: the metrics' model TFLOP/s per device and MFU, the peak's sources (trainer.peak_tflops, the
GPU table by NVML name, the measured CPU GEMM peak) and their bad input."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import ConfigError
from model import presets
from model.flops import flops_per_token
from trainer import mfu
from trainer.config import compose_config, load_config
from trainer.mfu import Throughput, gpu_peak_tflops

TINY = presets.load("tiny")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H800", 989.4), ("NVIDIA H800 PCIe", 756.0), ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA H20", 148.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-32GB", None),
])
def test_gpu_table_matches_whole_names(name, peak):
    """A name matches a whole word of the table, the most specific first: H20 is not H200, L4 not L40S."""
    assert gpu_peak_tflops(name) == peak


def test_record_is_model_flops_over_devices_and_peak():
    t = Throughput(TINY, 256, world_size=4, peak_flops=2e11, source="test")
    per_token = flops_per_token(TINY, 256)
    got = t.record(tokens_per_s=1234.0)
    assert math.isclose(got["tflops_per_device"], per_token * 1234.0 / 4 / 1e12, rel_tol=1e-12)
    assert math.isclose(got["mfu"], per_token * 1234.0 / 4 / 2e11, rel_tol=1e-12)
    assert Throughput(TINY, 256, 1, None, "unknown").record(10.0)["mfu"] is None


def test_peak_sources(monkeypatch):
    set_by_user = Throughput.for_run(TINY, 256, 1, 400.0, torch.device("cpu"), torch.float32)
    assert set_by_user.peak_flops == 400e12 and "trainer.peak_tflops=400" in set_by_user.line()
    cpu = Throughput.for_run(TINY, 256, 1, None, torch.device("cpu"), torch.float32)
    assert cpu.peak_flops > 1e8 and "measured CPU GEMM peak" in cpu.line()
    monkeypatch.setattr(mfu, "gpu_name", lambda device: "NVIDIA H800")
    h800 = Throughput.for_run(TINY, 256, 8, None, torch.device("cuda", 0), torch.bfloat16)
    assert h800.peak_flops == 989.4e12 and "NVIDIA H800: dense BF16 peak 989.4" in h800.line()
    monkeypatch.setattr(mfu, "gpu_name", lambda device: "NVIDIA GeForce RTX 4090")
    unknown = Throughput.for_run(TINY, 256, 8, None, torch.device("cuda", 0), torch.bfloat16)
    assert unknown.peak_flops is None and unknown.record(1e5)["mfu"] is None
    assert "not in trainer/mfu.py's GPU table" in unknown.line() and "trainer.peak_tflops=" in unknown.line()


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_peak_tflops_names_the_field(value):
    with pytest.raises(ConfigError, match=r"trainer.peak_tflops: must be > 0"):
        load_config(compose_config([f"trainer.peak_tflops={value}"]))
