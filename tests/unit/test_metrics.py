"""Metrics (trainer/metrics.py): JSONL records, resume truncation, the console line, loss.png, W&B offline,
and silence without NVML or a GPU."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from trainer import metrics as metrics_module
from trainer.config import LoggingConfig
from trainer.metrics import Metrics

REQUIRED = ("step", "tokens", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "maxvio",
            "step_time_s", "tokens_per_s")


def record(step: int, **extra) -> dict:
    loss = 5.0 / step
    return {"step": step, "tokens": 64 * step, "loss": loss, "lm_loss": 0.9 * loss, "mtp_loss": loss,
            "aux_loss": 1e-4, "lr": 1e-3, "grad_norm": 0.5, "maxvio": 0.25, "step_time_s": 0.01,
            "tokens_per_s": 6400.0, **extra}


def read(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(run_dir, steps, resume_step=0, **cfg) -> Metrics:
    m = Metrics(run_dir, LoggingConfig(**cfg), total_steps=10, run_config={"x": 1}, resume_step=resume_step)
    for step in steps:
        m.log_step(record(step, maxvio_layer={1: 0.2, 2: 0.3}, skipped=False))
        if step % 2 == 0:
            m.log_eval(step, {"val_loss": 4.0 / step})
    return m


def test_jsonl_records_and_console(tmp_path, capsys):
    m = run(tmp_path, range(1, 11), log_every=5, plot=False)
    m.log_step(record(11, loss=float("nan"), skipped=True))
    assert m.close() is None
    records = read(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in train] == list(range(1, 12)) and [r["step"] for r in valid] == [2, 4, 6, 8, 10]
    assert all(key in r for r in train for key in REQUIRED)
    assert train[0]["maxvio_layer"] == {"1": 0.2, "2": 0.3}
    assert train[-1]["loss"] is None and train[-1]["skipped"] is True  # NaN stored as standard JSON null
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if "tok/s" in line]
    assert [line.split(" |")[0] for line in progress] == ["step 5/10", "step 10/10"]
    assert "ETA 0:00:00" in progress[-1] and "maxvio 0.2500" in progress[0] and "lr 1.00e-03" in progress[0]
    assert "step 2/10 | val_loss 2.0000" in lines


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    run(tmp_path, range(1, 8), plot=False).close()  # checkpoint at step 4, crash after step 7
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "spl')  # a line torn by the crash
    m = run(tmp_path, range(5, 11), resume_step=4, plot=False)
    m.close()
    records = read(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in records if r["split"] == "valid"] == [2, 4, 6, 8, 10]


def test_loss_plot(tmp_path):
    m = run(tmp_path, range(1, 11), plot=True)
    path = m.close()
    assert path == tmp_path / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m.close() is None  # closing twice is harmless


def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # dir= must win
    run(tmp_path, range(1, 4), wandb=True, plot=False).close()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_wandb_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"pip install wandb` or set logging\.wandb=false"):
        Metrics(tmp_path, LoggingConfig(wandb=True), 10, {})


@pytest.mark.parametrize("nvml", ["absent", "present"])
def test_no_gpu_metrics_and_no_noise_without_nvml_or_gpu(tmp_path, monkeypatch, capsys, nvml):
    if nvml == "absent":
        monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(metrics_module.torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(tmp_path, [1], log_every=1, plot=False).close()
    assert "gpu_mem_gb" not in read(tmp_path)[0]
    assert capsys.readouterr().err == ""


def test_nvml_without_driver_is_silent(monkeypatch):
    class BrokenNvml:
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", BrokenNvml())
    monkeypatch.setattr(metrics_module.torch.cuda, "is_available", lambda: True)
    assert metrics_module.GpuMonitor.create() is None
