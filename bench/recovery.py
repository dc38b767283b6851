"""Time to recover from a dead rank under `hai-launch --max-restarts` (issue 15): kill to the first new step.

A 2-process DP job of a small model (2 layers, 64 wide; 12 steps, a checkpoint every 4) runs under
`hai-launch --dp 2 --max-restarts 1`. Once its first checkpoint is complete, rank 1 is SIGKILLed (found by its
environment); torchrun stops rank 0, starts both again, they resume from the checkpoint. Measured: seconds from the
kill to the first training record after the resume, over ROUNDS jobs, and whether each job ended with exit 0 and the
losses of an uninterrupted run of the same command (run once first).

    python -m bench.recovery   # prints the table, writes bench/results/recovery.json
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ROUNDS = 3
OVERRIDES = ["model=tiny", "model.n_layers=2", "model.dim=64", "model.vocab_size=512", "model.n_routed_experts=8",
             "model.n_group=4", "model.topk_group=2", "model.n_activated_experts=2", "model.inter_dim=128",
             "model.moe_inter_dim=32", "data.vocab_size=512", "data.corpus_bytes=300000", "data.seq_len=64",
             "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.eval_every=0", "logging.plot=false",
             "optim.warmup_steps=2", "trainer.max_steps=12", "trainer.checkpoint_every=4"]


def _launch(run: Path, cache: Path, tag: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.launch", "--dp", "2", "--max-restarts", "1", *OVERRIDES,
           f"data.cache_dir={cache}", f"trainer.run_dir={run}"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HAI_BENCH_TAG": tag}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def _rank_pid(tag: str, rank: int) -> int | None:
    want = {f"HAI_BENCH_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and want <= set((entry / "environ").read_bytes().split(b"\0")):
                return int(entry.name)
        except OSError:
            continue
    return None


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # being written
    return [r for r in out if r.get("split") == "train"]


def _one(work: Path, cache: Path, straight: list[float]) -> dict:
    tag, run = uuid.uuid4().hex, work / f"run_{uuid.uuid4().hex[:6]}"
    job = _launch(run, cache, tag)
    while not (run / "checkpoints" / "latest").exists() and job.poll() is None:
        time.sleep(0.02)
    pid = _rank_pid(tag, 1)
    os.kill(pid, signal.SIGKILL)
    killed, recovered = time.monotonic(), None
    log = run / "train.rank0.log"
    while job.poll() is None and recovered is None:
        resumed = log.exists() and "resumed from" in log.read_text()
        if resumed and any(r["step"] > 4 for r in _records(run)):
            recovered = time.monotonic() - killed
        time.sleep(0.02)
    code = job.wait()
    losses = [r["loss"] for r in _records(run)]
    return {"recover_s": recovered, "exit": code, "same_losses": losses == straight}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recovery_"))
    cache = work / "cache"
    first = _launch(work / "straight", cache, "straight")
    if first.wait() != 0:
        raise SystemExit("the uninterrupted run failed")
    straight = [r["loss"] for r in _records(work / "straight")]
    rows = [_one(work, cache, straight) for _ in range(ROUNDS)]
    times = [r["recover_s"] for r in rows if r["recover_s"] is not None]
    print(f"hai-launch --dp 2 --max-restarts 1, rank 1 SIGKILLed after the first checkpoint, {ROUNDS} jobs")
    for r in rows:
        print(f"  kill -> first new step {r['recover_s']:.1f} s, exit {r['exit']}, "
              f"losses {'equal' if r['same_losses'] else 'DIFFER from'} the uninterrupted run's")
    if times:
        print(f"median {statistics.median(times):.1f} s")
    (RESULTS / "recovery.json").write_text(json.dumps({"rounds": rows, "median_s": statistics.median(times)
                                                       if times else None}, indent=1))


if __name__ == "__main__":
    main()
