"""What a GPU run checks before any process group exists, tested on the CPU by faking the environment and the
capability probe: the launcher's LOCAL_RANK / LOCAL_WORLD_SIZE and parallel.gpus_per_node, trainer.device=cuda
without CUDA, fp8=hopper without a Hopper GPU; and the GPU defaults (trainer.dtype=auto)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from core.config import ConfigError
from parallel.config import ParallelConfig
from parallel.grid import check_launch, device_type
from trainer.config import compose_config, load_config
from trainer.train import preflight

CUDA0 = torch.device("cuda", 0)
TORCHRUN = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "RANK": "11", "WORLD_SIZE": "16"}


def test_a_gpu_job_of_several_processes_needs_its_launcher():
    cfg = ParallelConfig(gpus_per_node=8)
    check_launch(cfg, 16, CUDA0, TORCHRUN, device_count=8)  # torchrun / SLURM: fine
    check_launch(cfg, 1, CUDA0, {}, device_count=1)  # one process: GPU 0 is right
    check_launch(cfg, 16, torch.device("cpu"), {}, device_count=0)  # CPU runs simulate nodes: nothing to check
    with pytest.raises(ConfigError, match="16 processes on CUDA but LOCAL_RANK and LOCAL_WORLD_SIZE not set: start "
                                          "the job with torchrun"):
        check_launch(cfg, 16, CUDA0, {"RANK": "1", "WORLD_SIZE": "16"}, device_count=8)


def test_gpus_per_node_must_be_what_the_launcher_started():
    with pytest.raises(ConfigError, match=r"parallel.gpus_per_node=4 but the launcher started LOCAL_WORLD_SIZE=8 "
                                          r"processes on this node; set parallel.gpus_per_node=8"):
        check_launch(ParallelConfig(gpus_per_node=4), 16, CUDA0, TORCHRUN, device_count=8)
    with pytest.raises(ConfigError, match="LOCAL_RANK=3 but this node has 2 GPU"):
        check_launch(ParallelConfig(gpus_per_node=8), 16, CUDA0, TORCHRUN, device_count=2)


def test_cuda_device_without_cuda_is_refused_before_anything():
    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA device is available"):
        device_type("cuda", cuda=False)
    with mock.patch("torch.cuda.is_available", return_value=False), pytest.raises(ConfigError, match="trainer.dev"):
        load_config(compose_config(["trainer.device=cuda"]))
    assert (device_type("auto", cuda=False), device_type("auto", cuda=True), device_type("cpu", cuda=True)) == \
           ("cpu", "cuda", "cpu")


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert load_config(compose_config([])).trainer.dtype == "fp32"
    with mock.patch("torch.cuda.is_available", return_value=True):
        cfg = load_config(compose_config([]))
        assert cfg.trainer.dtype == "bf16" and cfg.trainer.tf32 and not cfg.trainer.deterministic
        assert load_config(compose_config(["trainer.dtype=fp32"])).trainer.dtype == "fp32"  # asked for: kept


def test_hopper_recipe_without_a_hopper_gpu_names_what_it_found():
    cfg = load_config(compose_config(["fp8=hopper"]))
    with mock.patch("torch.cuda.is_available", return_value=False):
        with pytest.raises(ConfigError, match=r"fp8.backend=torch cannot run on this machine; missing: a CUDA GPU"):
            preflight(cfg)
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)), \
            mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100-SXM4-80GB"):
        with pytest.raises(ConfigError, match=r"a Hopper GPU \(sm90 or newer\); this one is sm80 \(NVIDIA A100"):
            preflight(cfg)
    preflight(load_config(compose_config(["fp8=emulate"])))  # the reference GEMM runs anywhere


def test_the_all_to_all_sm_cap_reaches_nccl_on_the_ep_groups_only_on_cuda():
    """parallel.a2a_sms becomes ProcessGroupNCCL.Options().config.max_ctas for the EP groups (paper 3.2.2: 20 SMs
    for communication); nothing on the CPU or with null; a cap below 1 is refused naming the key."""
    import torch.distributed as dist

    from parallel.grid import nccl_options

    class Options:
        def __init__(self):
            self.config = type("Config", (), {"max_ctas": -1})()

    with mock.patch.object(dist, "ProcessGroupNCCL", type("PG", (), {"Options": Options}), create=True):
        assert nccl_options(20, "cuda").config.max_ctas == 20
        assert nccl_options(None, "cuda") is None
        assert nccl_options(20, "cpu") is None
    assert ParallelConfig().a2a_sms == 20
    with pytest.raises(ConfigError, match=r"parallel.a2a_sms=0: must be >= 1"):
        ParallelConfig(a2a_sms=0).validate(1)
