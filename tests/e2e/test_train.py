"""hai-train as a user runs it: the loop end to end, a resume after SIGKILL that is bitwise identical to an
uninterrupted run, an ablation with one run directory per point, and the errors of bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.flops import flops_per_token
from trainer.config import compose_config, load_config

ROOT = Path(__file__).resolve().parents[2]

# a small model and corpus so that a run takes seconds
FAST = ["model=tiny", "model.n_layers=2", "model.dim=64", "model.vocab_size=512", "model.n_routed_experts=8",
        "model.n_group=4", "model.topk_group=2", "model.n_activated_experts=2", "model.inter_dim=128",
        "model.moe_inter_dim=32", "data.vocab_size=512", "data.corpus_bytes=300000", "data.seq_len=64",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.eval_every=0",
        "logging.log_every=1", "logging.plot=false", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def hai_train(args: list[str], cache: Path, **kwargs) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) come before the overrides
    cmd = [sys.executable, "-m", "trainer.train", *flags, *FAST, f"data.cache_dir={cache}",
           *[a for a in args if not a.startswith("-")]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("split") == "train"}


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_and_loss_falls(tmp_path, cache_dir):
    run = tmp_path / "run"
    result = hai_train(["trainer.max_steps=12", "trainer.checkpoint_every=6", "trainer.eval_every=6",
                        "logging.plot=true", "optim.lr=3e-3", f"trainer.run_dir={run}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("step", "tokens", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "maxvio",
                "step_time_s", "tokens_per_s", "tflops_per_device", "mfu"):
        assert key in train[0], key
    # model TFLOP/s per device from the analytic count (one process: the device does all of it) and MFU against
    # one peak (the CPU GEMM peak measured at start-up): the same ratio in every record
    cfg = load_config(compose_config(FAST))
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    for r in train:
        assert math.isclose(r["tflops_per_device"], per_token * r["tokens_per_s"] / 1e12, rel_tol=1e-9)
        assert r["mfu"] > 0
        assert math.isclose(r["mfu"] / r["tflops_per_device"], train[0]["mfu"] / train[0]["tflops_per_device"],
                            rel_tol=1e-9)
    assert "GFLOP per token" in result.stdout and "measured CPU GEMM peak" in result.stdout
    assert any(r["split"] == "valid" and "val_loss" in r for r in records)
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3]) - 0.5
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000006", "step_00000012"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, cache_dir):
    steps = ["trainer.max_steps=8", "trainer.checkpoint_every=4"]
    straight = tmp_path / "straight"
    assert hai_train(steps + [f"trainer.run_dir={straight}"], cache_dir).returncode == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer.train", *FAST, f"data.cache_dir={cache_dir}", *steps,
           f"trainer.run_dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    resumed = hai_train(steps + [f"trainer.run_dir={killed}"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert train_losses(killed) == train_losses(straight)  # exact float equality, every step


@pytest.mark.slow
def test_multirun_ablation_leaves_one_run_directory_per_point(tmp_path, cache_dir):
    result = hai_train(["-m", "model.balance=aux_free,aux_loss", "trainer.max_steps=2",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(runs) == 2 and all((r / "metrics.jsonl").exists() for r in runs)
    points = {line.strip("- \n") for r in runs for line in (r / ".hydra" / "overrides.yaml").read_text().splitlines()
              if "model.balance" in line}
    assert points == {"model.balance=aux_free", "model.balance=aux_loss"}


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert hai_train(["trainer.max_steps=3", f"trainer.run_dir={run}"], cache_dir).returncode == 0
    # resume with a learning rate so large that the loss overflows
    result = hai_train(["trainer.max_steps=8", "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                        f"trainer.run_dir={run}"], cache_dir)
    assert result.returncode == 2
    assert "non-finite loss" in result.stderr and "step " in result.stderr
    assert "step_00000003" in result.stderr  # the last good checkpoint is named and kept
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"


@pytest.mark.parametrize("args,words", [
    (["+trainer.bogus=1"], "bogus"),  # unknown key (Hydra's struct mode catches keys without '+')
    (["trainer.global_batch_size=6"], "trainer.global_batch_size"),
    (["data.vocab_size=1024"], "model.vocab_size"),  # tokenizer vocabulary larger than the embedding
    (["trainer.run_dir=/proc/hai-llm-not-writable"], "/proc/hai-llm-not-writable"),
])
def test_bad_input_is_a_clear_error(tmp_path, cache_dir, args, words):
    result = hai_train(["trainer.max_steps=1", f"trainer.run_dir={tmp_path / 'run'}", *args]
                       if not any(a.startswith("trainer.run_dir") for a in args) else ["trainer.max_steps=1", *args],
                       cache_dir)
    assert result.returncode != 0
    assert words in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("override,words", [
    ("optim.lr=abc", ["optim.lr='abc'", "a number"]),
    ("parallel.pp=two", ["parallel.pp='two'", "an integer"]),
    ("model.balance=foo", ["model.balance='foo'", "aux_free, aux_loss, batch_aux, none"]),
    ("fp8.recipe=fast", ["fp8.recipe='fast'", "off, emulate, hopper"]),
    ("data.bogus=1", ["data.bogus", "its keys are: seq_len"]),
    pytest.param("fp8=hopper", ["fp8.backend=torch cannot run on this machine", "a CUDA GPU"],
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")),
])
def test_bad_override_is_one_paragraph_without_traceback(tmp_path, cache_dir, override, words):
    result = hai_train(["trainer.max_steps=1", f"trainer.run_dir={tmp_path / 'run'}", override], cache_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # nothing was written (Hydra may have made the directory)


@pytest.mark.slow
def test_resume_from_another_model_is_refused(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert hai_train(["trainer.max_steps=1", f"trainer.run_dir={run}"], cache_dir).returncode == 0
    result = hai_train(["trainer.max_steps=2", "model.dim=96", f"trainer.run_dir={run}"], cache_dir)
    assert result.returncode == 2
    assert "dim" in result.stderr and "64" in result.stderr and "96" in result.stderr


@pytest.mark.slow
def test_bf16_run_keeps_router_and_master_weights_in_fp32(tmp_path, cache_dir):
    import torch

    from trainer.checkpoint import load_checkpoint

    run = tmp_path / "run"
    result = hai_train(["trainer.max_steps=2", "trainer.dtype=bf16", "optim.moment_dtype=bf16",
                        f"trainer.run_dir={run}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000002"
    tensors, _ = load_checkpoint(ckpt)
    model, optim = tensors["model"], tensors["optim"]
    assert model["layers.1.ffn.gate.weight"].dtype == torch.float32
    assert model["layers.1.ffn.gate.bias"].dtype == torch.float32
    assert model["layers.1.attn.wkv_a.weight"].dtype == torch.bfloat16
    master = optim["master.layers.1.attn.wkv_a.weight"]
    assert master.dtype == torch.float32 and torch.equal(master.to(torch.bfloat16), model["layers.1.attn.wkv_a.weight"])
    assert optim["exp_avg.layers.1.attn.wkv_a.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_deterministic_mode_runs_and_changes_nothing_on_the_cpu(tmp_path, cache_dir):
    """trainer.deterministic=true (torch's deterministic algorithms) accepts every op of a training step; on the
    CPU, deterministic already, the losses are the same bit for bit."""
    runs = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        result = hai_train(["trainer.max_steps=2", f"trainer.deterministic={flag}", f"trainer.run_dir={run}"],
                           cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[flag] = train_losses(run)
    assert runs["true"] == runs["false"] and len(runs["true"]) == 2
