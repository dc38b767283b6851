"""(b) hai-train on one GPU: 10 steps in bf16 with fp8=hopper, an EMA and a checkpoint, a resume to step 20, then
3 steps with fp8=off; (c) the host syncs of one training step, counted by CUDA itself
(`torch.cuda.set_sync_debug_mode("warn")`) next to core/syncs.py's count, and the peak memory of model=small at
data.seq_len=4096 with 1 and with 4 micro-batches alive at once."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMALL_DATA = ["data.corpus_bytes=300000", "data.vocab_size=8192", "logging.plot=false", "trainer.eval_every=5"]


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trainer.train", *SMALL_DATA, *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _gpu_backend() -> str | None:
    """The first FP8 GEMM backend that runs here (fp8.backend for fp8=hopper), or None."""
    from fp8.gemm import BackendUnavailable, check_backend

    for name in ("torch", "te", "deepgemm"):
        try:
            check_backend(name)
            return name
        except BackendUnavailable:
            continue
    return None


def test_train_fp8_on_one_gpu_with_ema_checkpoint_and_resume(tmp_path, smoke):
    backend = _gpu_backend()
    if backend is None:
        smoke["train_fp8_hopper"] = "no FP8 GEMM backend runs here (see fp8_backends)"
        pytest.skip("no FP8 GEMM backend runs on this machine")
    run, cache = tmp_path / "fp8", tmp_path / "cache"
    common = ["trainer.dtype=bf16", "fp8=hopper", f"fp8.backend={backend}", "trainer.ema_decay=0.9",
              "trainer.checkpoint_every=10", f"trainer.run_dir={run}", f"data.cache_dir={cache}"]
    _train([*common, "trainer.max_steps=10"], tmp_path)
    resumed = _train([*common, "trainer.max_steps=20"], tmp_path)
    assert "resumed from" in resumed.stdout
    train = [r for r in _records(run) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21)) and all(r["loss"] == r["loss"] for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    off = tmp_path / "off"
    _train(["trainer.dtype=bf16", "fp8=off", "trainer.max_steps=3", f"trainer.run_dir={off}",
            f"data.cache_dir={cache}"], tmp_path)
    smoke["train_fp8_hopper"] = {"backend": backend, "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
                                 "tokens_per_s_last": train[-1]["tokens_per_s"],
                                 "gpu_mem_gb": train[-1].get("gpu_mem_gb_max")}
    smoke["train_bf16_3_steps_tokens_per_s"] = [r["tokens_per_s"] for r in _records(off) if r["split"] == "train"]


def _build(overrides: list[str]):
    from parallel.grid import ProcessGrid
    from trainer.config import compose_config, load_config
    from trainer.state import TrainState
    from trainer.train import build

    cfg = load_config(compose_config(overrides))
    grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
    return cfg, grid, build(cfg, grid), TrainState()


def test_host_syncs_of_one_step_counted_by_cuda(tmp_path, smoke):
    from core.syncs import HostSyncCounter
    from trainer.train import optimizer_step

    cfg, grid, run, state = _build([*SMALL_DATA, f"data.cache_dir={tmp_path / 'cache'}", "trainer.dtype=bf16"])
    optimizer_step(cfg, grid, state, run, None, tmp_path)  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, HostSyncCounter(where=True) as ours:
            warnings.simplefilter("always")
            optimizer_step(cfg, grid, state, run, None, tmp_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    by_cuda = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    smoke["host_syncs_one_step"] = {"cuda_sync_debug": len(by_cuda), "core_syncs": ours.total,
                                    "core_syncs_by_call": dict(ours.counts), "sites": dict(ours.sites)}
    assert len(by_cuda) <= ours.total + 2, by_cuda[:10]  # ours models CUDA's; allow the EMA/pinned copies


def test_peak_memory_of_small_at_4k_with_1_and_4_live_micro_batches(smoke):
    from model import Transformer, presets
    from model.grads import attach_main_grads
    from trainer.train import cast_for_compute

    cfg = presets.load("small")
    torch.manual_seed(0)
    model = Transformer(cfg).cuda()
    cast_for_compute(model, torch.bfloat16)
    attach_main_grads(model.parameters())
    tokens = torch.randint(cfg.vocab_size, (1, 4096), device="cuda")
    peaks = {}
    for live in (1, 4):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        losses = [model.loss(tokens, tokens, mtp_lambda=0.3).loss / live for _ in range(live)]
        for loss in losses:
            loss.backward()
        torch.cuda.synchronize()
        peaks[live] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None
    smoke["small_seq4096_peak_activation_gib"] = {"1 live": peaks[1], "4 live": peaks[4],
                                                   "per extra micro-batch": (peaks[4] - peaks[1]) / 3}
    assert peaks[4] > peaks[1] > 0
