"""`hai-launch`: the torchrun command it builds from the config and flags (--dry-run, in process), and real
2-process torchrun jobs of tests/e2e/dist_probe.py: success, a rank that raises and a rank killed by SIGKILL,
each ending the whole job quickly with the failing rank named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.launch import build, main, omp_threads

ROOT = Path(__file__).resolve().parents[2]


def dry_run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["--dry-run", *argv])
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_nproc_defaults_to_pp_times_ep(capsys, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code, out, _ = dry_run(capsys, "experiment=tiny_parallel", "trainer.max_steps=3")
    assert code == 0
    assert out == (f"OMP_NUM_THREADS={omp_threads(4)} {sys.executable} -m torch.distributed.run --standalone "
                   "--nproc_per_node 4 -m trainer.train experiment=tiny_parallel trainer.max_steps=3")
    code, out, _ = dry_run(capsys)  # parallel=single: one process
    assert code == 0 and "--nproc_per_node 1 -m trainer.train" in out


def test_dp_and_nproc_flags(capsys) -> None:
    assert "--nproc_per_node 4 " in dry_run(capsys, "--dp", "4", "parallel=dp4_ep2", "trainer.micro_batch_size=2")[1]
    assert "--nproc_per_node 3 " in dry_run(capsys, "--nproc", "3", "trainer.micro_batch_size=1",
                                            "trainer.global_batch_size=6")[1]


def test_layout_refused_before_any_process_starts(capsys) -> None:
    code, out, err = dry_run(capsys, "--dp", "3", "parallel=dp4_ep2")
    assert code == 2 and out == ""
    assert "world size 3" in err and "parallel.ep=2 does not divide" in err
    code, _, err = dry_run(capsys, "--nproc", "3", "parallel.pp=3", "parallel.schedule=dualpipe")
    assert code == 2 and "dualpipe needs an even number of pipeline ranks, got parallel.pp=3" in err
    code, _, err = dry_run(capsys, "--nproc", "2", "parallel.pp=2", "parallel.schedule=dualpipe")
    assert code == 2 and "parallel.microbatches" in err  # tiny's 8 sequences in micro-batches of 8: 1 < 2 x pp
    code, _, err = dry_run(capsys, "model.nope=1")
    assert code == 2 and "cannot compose" in err


def test_hydra_flags_and_separator_pass_through(capsys) -> None:
    out = dry_run(capsys, "--nproc", "2", "--cfg", "job", "trainer.micro_batch_size=4", "--", "--nproc", "7")[1]
    assert out.endswith("-m trainer.train --cfg job trainer.micro_batch_size=4 --nproc 7")


def test_multi_node_uses_c10d_rendezvous(capsys) -> None:
    out = dry_run(capsys, "--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "42", "--nproc", "2",
                  "trainer.micro_batch_size=2")[1]
    assert ("-m torch.distributed.run --nnodes 2 --rdzv_backend c10d --rdzv_endpoint node0:29400 --rdzv_id 42 "
            "--nproc_per_node 2 -m trainer.train") in out
    assert "--standalone" not in out
    code, _, err = dry_run(capsys, "--nnodes", "2", "--nproc", "2", "trainer.micro_batch_size=2")
    assert code == 2 and "--rdzv-endpoint" in err
    # world = pp * dp split over the nodes
    assert "--nproc_per_node 2 " in dry_run(capsys, "--nnodes", "2", "--rdzv-endpoint", "h:1", "--dp", "4",
                                            "parallel=dp4_ep2", "trainer.micro_batch_size=2")[1]


def test_omp_threads_kept_when_set(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert build(["--nproc", "2", "trainer.micro_batch_size=4"])[1] == {}
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert build(["--nproc", "64", "trainer.micro_batch_size=1", "trainer.global_batch_size=64"])[1] == \
        {"OMP_NUM_THREADS": "1"}


def launch_probe(out: Path, *flags: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "launch.launch", "--module", "tests.e2e.dist_probe", "--nproc", "2",
                             "--out", str(out), *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - t0


def root_cause(output: str) -> str:
    """torchrun's failure summary from 'Root Cause' on."""
    match = re.search(r"Root Cause.*", output, re.DOTALL)
    assert match, output[-3000:]
    return match.group(0)


@pytest.mark.slow
def test_two_processes_all_reduce(tmp_path: Path) -> None:
    result, _ = launch_probe(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].endswith(
        f"-m torch.distributed.run --standalone --nproc_per_node 2 -m tests.e2e.dist_probe --out {tmp_path}")
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["sum"]) for r in records] == [(0, 2, 1), (1, 2, 1)]


@pytest.mark.slow
def test_rank_that_raises_ends_the_job(tmp_path: Path) -> None:
    result, seconds = launch_probe(tmp_path, "--fail-rank", "1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: dist_probe: rank 1 fails on purpose" in output
    # exit code 1, or SIGABRT (-6) when gloo's threads abort while the interpreter exits after the exception
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: (1|-6) ", root_cause(output)), output[-3000:]
    assert seconds < 60


@pytest.mark.slow
def test_rank_killed_by_sigkill_ends_the_job(tmp_path: Path) -> None:
    result, seconds = launch_probe(tmp_path, "--kill-rank", "1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9 ", root_cause(output)), output[-3000:]
    assert "SIGKILL" in root_cause(output)
    assert seconds < 60


# a small model and corpus (as tests/e2e/test_train.py) so that a 2-process run takes seconds
SMALL = ["model.n_layers=2", "model.dim=64", "model.vocab_size=512", "model.n_routed_experts=8", "model.n_group=4",
         "model.topk_group=2", "model.n_activated_experts=2", "model.inter_dim=128", "model.moe_inter_dim=32",
         "data.vocab_size=512", "data.corpus_bytes=300000", "data.seq_len=32", "trainer.micro_batch_size=4",
         "trainer.eval_every=0", "logging.plot=false", "trainer.max_steps=1"]


@pytest.mark.slow
def test_every_rank_uses_the_one_run_directory(tmp_path: Path) -> None:
    """Two torchrun ranks of hai-train leave one runs/<experiment>/<time>/ holding both ranks' logs and rank 0's
    .hydra/; with trainer.run_dir set, nothing is written anywhere else (the working directory stays empty)."""
    cache = tmp_path / "cache"
    for fixed in (None, tmp_path / "fixed"):
        work = tmp_path / ("work_fixed" if fixed else "work")
        work.mkdir()
        args = [*SMALL, f"data.cache_dir={cache}", *([f"trainer.run_dir={fixed}"] if fixed else [])]
        result = subprocess.run([sys.executable, "-m", "launch.launch", "--nproc", "2", *args], cwd=work,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        if fixed is None:
            runs = list((work / "runs" / "tiny").iterdir())
            assert len(runs) == 1 and sorted(p.name for p in work.iterdir()) == ["runs"], runs
            run = runs[0]
        else:
            assert list(work.iterdir()) == [], list(work.iterdir())
            run = fixed
        names = {p.name for p in run.iterdir()}
        assert {"train.rank0.log", "train.rank1.log", ".hydra", "metrics.jsonl", "checkpoints"} <= names, names
        assert "train.log" not in names  # Hydra's own job log is not written
        assert f"run directory: {run}" in (run / "train.rank0.log").read_text()
        assert "model.dim=64" in (run / ".hydra" / "overrides.yaml").read_text()


def test_max_restarts_needs_resume_auto_and_fixes_the_run_directory(capsys, monkeypatch) -> None:
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    code, out, err = dry_run(capsys, "--nproc", "2", "--max-restarts", "2", "trainer.micro_batch_size=4",
                             "trainer.resume=null")
    assert code == 2 and out == ""
    assert "--max-restarts 2" in err and "trainer.resume=None" in err and "set trainer.resume=auto" in err
    code, out, _ = dry_run(capsys, "--nproc", "2", "--max-restarts", "2", "trainer.micro_batch_size=4")
    assert code == 0 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " in out and " --max-restarts 2 " in out
    assert re.search(r" trainer\.run_dir=runs/tiny/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d$", out)  # one directory for all
    code, out, _ = dry_run(capsys, "--nproc", "2", "--max-restarts", "1", "trainer.micro_batch_size=4",
                           "trainer.run_dir=runs/mine")
    assert code == 0 and out.endswith("trainer.run_dir=runs/mine") and out.count("trainer.run_dir=") == 1
    code, _, err = dry_run(capsys, "--nproc", "2", "--max-restarts", "-1", "trainer.micro_batch_size=4")
    assert code == 2 and "--max-restarts must be >= 0" in err
