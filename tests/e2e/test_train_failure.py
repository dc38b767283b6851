"""The real trainer under torchrun (`hai-launch`, DP=2): a rank killed by SIGKILL mid-run ends the whole job
within seconds, with a non-zero exit naming the rank; the same command run again resumes from the last
checkpoint both ranks wrote and ends with exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_launch import root_cause
from tests.e2e.test_train import FAST, ROOT, train_losses

STEPS = ["trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.micro_batch_size=2"]


def launch(run: Path, cache: Path, tag: str = "", flags: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.launch", "--dp", "2", *flags, *FAST, *STEPS, f"data.cache_dir={cache}",
           f"trainer.run_dir={run}"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HAI_TEST_TAG": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def worker_pid(tag: str, rank: int) -> int | None:
    """The process torchrun started as `rank` for this test (found by its environment)."""
    want = {f"HAI_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = set((entry / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                return int(entry.name)
    return None


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, list[float]]:
    """(the data cache, the losses of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("straight")
    job = launch(root / "run", root / "cache")
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out[-3000:]
    return root / "cache", train_losses(root / "run")


def _kill_after_first_checkpoint(job: subprocess.Popen, run: Path, tag: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to rank 1 once the first checkpoint is complete; returns its pid."""
    deadline = time.time() + 300
    while not (run / "checkpoints" / "latest").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = worker_pid(tag, 1)
    assert pid is not None and job.poll() is None, "the job ended before its first checkpoint"
    os.kill(pid, sig)
    return pid


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_the_run_resumes(tmp_path, straight):
    cache, straight_losses = straight
    tag, run = uuid.uuid4().hex, tmp_path / "killed"
    job = launch(run, cache, tag)
    _kill_after_first_checkpoint(job, run, tag)
    t0 = time.monotonic()
    out = job.communicate(timeout=120)[0]
    seconds = time.monotonic() - t0
    assert job.returncode != 0
    assert "rank      : 1" in root_cause(out) and "SIGKILL" in root_cause(out), out[-3000:]
    assert seconds < 60, seconds
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    again = launch(run, cache)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert train_losses(run) == straight_losses


@pytest.mark.slow
def test_with_max_restarts_a_killed_rank_is_restarted_and_the_job_ends_as_if_uninterrupted(tmp_path, straight):
    """hai-launch --max-restarts 1: torchrun restarts both workers, they resume from the newest complete checkpoint,
    and the job exits 0 with exactly the uninterrupted losses. Printed: kill to the first step after it."""
    cache, straight_losses = straight
    tag, run = uuid.uuid4().hex, tmp_path / "restarted"
    job = launch(run, cache, tag, flags=("--max-restarts", "1"))
    _kill_after_first_checkpoint(job, run, tag)
    killed, recovered = time.monotonic(), None
    while job.poll() is None and recovered is None:
        if "resumed from" in _log(run) and _last_step(run) > 4:
            recovered = time.monotonic() - killed
        time.sleep(0.05)
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out[-3000:]
    assert "resumed from" in _log(run) and train_losses(run) == straight_losses
    print(f"recovered in {recovered:.1f} s (kill to the first new step)" if recovered else "recovered (not timed)")


def _last_step(run: Path) -> int:
    steps = [0]
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return max(steps)


def _log(run: Path) -> str:
    return "".join(p.read_text() for p in run.glob("train.rank*.log"))


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_with_every_threads_stack(tmp_path, straight):
    """trainer.hang_timeout_s: rank 1 is stopped (SIGSTOP: alive, making no progress) after the first checkpoint;
    rank 0, waiting for it in a collective, finds no finished step for 6 s, writes its threads' stacks and the
    flight recorder's record of its collectives (gloo's here, NCCL's on GPUs) into the run directory, names itself,
    the step and the collective it waits in, and ends the job non-zero instead of hanging. torch's own analyser,
    torchfrtrace, reads the dump and finds the stuck rank: the one whose record is missing."""
    cache, _ = straight
    tag, run = uuid.uuid4().hex, tmp_path / "stuck"
    job = launch(run, cache, tag, flags=("trainer.hang_timeout_s=6",))
    pid = _kill_after_first_checkpoint(job, run, tag, signal.SIGSTOP)
    try:
        out = job.communicate(timeout=180)[0]
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert job.returncode != 0
    assert "error (rank 0): no progress for 6 s in step" in out and "trainer.hang_timeout_s" in out, out[-3000:]
    stacks = (run / "hang.rank0.txt").read_text()
    assert "no progress for 6 s after step" in stacks and "most recent call first" in stacks
    assert "all_reduce" in stacks or "wait" in stacks or "reduce" in stacks, stacks[-2000:]
    waiting = re.search(r"waiting in (gloo:\w+) #(\d+) of group (\w+\[0,1\])", out)
    assert waiting, out[-3000:]
    trace = pickle.loads((run / "nccl_trace" / "hang_gloo_rank_0").read_bytes())
    pending = [e for e in trace["entries"] if not e["retired"]]
    first = min(pending, key=lambda e: e["time_created_ns"])
    assert (first["profiling_name"], str(first["collective_seq_id"] or first["p2p_seq_id"])) == waiting.groups()[:2]
    group = trace["pg_config"][first["process_group"][0]]
    assert group["desc"] == waiting.group(3) and group["ranks"] == "[0, 1]"
    analyser = [sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(run / "nccl_trace")]
    report = subprocess.run([*analyser, "--prefix", "hang_gloo_rank_", "--allow-incomplete-ranks"],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "missed FR dumps from ranks ({1})" in report.stdout + report.stderr, report
