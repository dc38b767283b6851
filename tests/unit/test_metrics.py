"""Metrics (trainer/metrics.py): JSONL records, resume truncation, the console line, loss.png, W&B offline (its
keys per step bounded whatever the world size), silence without NVML or a GPU, the per-rank lists every
logging.per_rank_every steps (trainer/reduce.py, in one process) and that setting's check."""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace

import pytest
from torch import nn

from core.config import ConfigError
from parallel.config import ParallelConfig
from parallel.grid import ProcessGrid
from trainer import metrics as metrics_module
from trainer.config import LoggingConfig, compose_config, load_config
from trainer.metrics import Metrics
from trainer.reduce import RankStats

REQUIRED = ("step", "tokens", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "maxvio",
            "step_time_s", "tokens_per_s")


def record(step: int, **extra) -> dict:
    loss = 5.0 / step
    return {"step": step, "tokens": 64 * step, "loss": loss, "lm_loss": 0.9 * loss, "mtp_loss": loss,
            "aux_loss": 1e-4, "lr": 1e-3, "grad_norm": 0.5, "maxvio": 0.25, "step_time_s": 0.01,
            "tokens_per_s": 6400.0, **extra}


def one_rank_stats(every: int) -> RankStats:
    """The per-rank summaries of a one-process CPU run (no expert parallelism, no pipeline)."""
    grid = ProcessGrid.build(ParallelConfig(), "cpu")
    return RankStats(grid, nn.Linear(1, 1), SimpleNamespace(last_stats=None), fabric=False, per_rank_every=every)


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
        assert metrics_module.GpuMonitor.create() is None
        stats = one_rank_stats(1)
        m = Metrics(tmp_path, LoggingConfig(log_every=1, plot=False), 10, {})
        m.log_step(record(1, **stats.collect(1, 0.01)))
        m.close()
    assert not [k for k in read(tmp_path)[0] if k.startswith("gpu")] and "gpu" not in read(tmp_path)[0]["per_rank"]
    assert capsys.readouterr().err == ""


def test_nvml_without_driver_is_silent(monkeypatch):
    class BrokenNvml:
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", BrokenNvml())
    monkeypatch.setattr(metrics_module.torch.cuda, "is_available", lambda: True)
    assert metrics_module.GpuMonitor.create() is None


def test_per_rank_every_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"logging\.per_rank_every: must be >= 0 \(0 = never\), got -1"):
        load_config(compose_config(["logging.per_rank_every=-1"]))
    assert load_config(compose_config(["logging.per_rank_every=0"])).logging.per_rank_every == 0
    assert LoggingConfig().per_rank_every == 100


def test_per_rank_lists_exactly_every_n_steps():
    """One process (the summaries' collectives are no-ops): step_time_s summarised every step, its list of one
    value at steps 3 and 6 of 7 with logging.per_rank_every=3, and never with 0."""
    for every, listed in ((3, [3, 6]), (0, [])):
        stats = one_rank_stats(every)
        out = {step: stats.collect(step, 0.5 + step) for step in range(1, 8)}
        assert [s for s, r in out.items() if "per_rank" in r] == listed
        assert all(out[s]["per_rank"] == {"step_time_s": [0.5 + s]} for s in listed)
        assert out[2] == {"step_time_s_max": 2.5, "step_time_s_mean": 2.5, "step_time_s_argmax_rank": 0}


def scaled_record(step: int, world: int) -> dict:
    """A step record as the trainer writes it at `world` ranks: summaries, and every 2nd step the per-rank lists."""
    summaries = {f"{name}_{stat}": 0.1 for name in ("step_time_s", "all_to_all_wait_s")
                 for stat in ("max", "mean", "argmax_rank")}
    lists = {"per_rank": {"step_time_s": [0.1] * world, "all_to_all_wait_s": [0.01] * world}} if step % 2 == 0 else {}
    return record(step, maxvio_layer={"layers.1.ffn.gate": 0.2}, **summaries, **lists)


def test_wandb_keys_per_step_do_not_grow_with_world_size(tmp_path, monkeypatch):
    """W&B (a stand-in run object) gets the same bounded key set at 2 and 2048 ranks, no per-rank element; the lists
    are in metrics.jsonl."""
    logged: dict[int, list[set[str]]] = {}

    class FakeRun:
        def __init__(self, world: int) -> None:
            self.world = world

        def log(self, values: dict, step: int) -> None:
            logged.setdefault(self.world, []).append(set(values))

        def finish(self) -> None: ...

    for world in (2, 2048):
        monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
        sys.modules["wandb"].init = lambda world=world, **kwargs: FakeRun(world)
        m = Metrics(tmp_path / str(world), LoggingConfig(wandb=True, plot=False), 4, {})
        for step in range(1, 5):
            m.log_step(scaled_record(step, world))
        m.close()
        lines = read(tmp_path / str(world))
        assert [len(r["per_rank"]["step_time_s"]) for r in lines if "per_rank" in r] == [world, world]
    assert logged[2] == logged[2048] and len({frozenset(keys) for keys in logged[2]}) == 1
    keys = logged[2][0]
    assert len(keys) == len(scaled_record(1, 2)) - 1  # every number but the step, the layer's MaxVio under its name
    assert "maxvio_layer/layers.1.ffn.gate" in keys and not any("per_rank" in k for k in keys)


def test_progress_line_shows_the_fullest_gpu(tmp_path, capsys):
    m = Metrics(tmp_path, LoggingConfig(log_every=1, plot=False), 10, {})
    m.log_step(record(1, gpu_mem_gb_max=61.25, gpu_mem_gb_mean=50.0, gpu_mem_gb_argmax_rank=7, gpu_util_max=99.0,
                      gpu_util_mean=87.4, gpu_util_argmax_rank=3))
    m.close()
    assert "gpu 61.2 GB 87%" in capsys.readouterr().out
