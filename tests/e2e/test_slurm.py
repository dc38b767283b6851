"""launch/slurm/train.sbatch on a real SLURM cluster (tests/e2e/slurm_cluster.py: two simulated nodes on this
machine, installed from Debian when missing): a 2-node x 2-rank gloo job through c10d rendezvous, the real
trainer on one process, and a job whose rank raises ending FAILED without hanging.

Skipped only where SLURM cannot be installed (not root, no apt, no mirror); any other failure is a failure.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
PROBE = {"HAI_ENTRY": "-m tests.e2e.dist_probe", "GPUS_PER_NODE": "2"}
TINY = ["trainer.max_steps=2", "model.n_layers=2", "model.dim=64", "model.vocab_size=512", "data.vocab_size=512",
        "data.corpus_bytes=300000", "data.seq_len=64", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
        "trainer.eval_every=0", "logging.plot=false"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    try:
        running = SlurmCluster.start(n_nodes=2)
    except SlurmUnavailable as err:
        pytest.skip(f"SLURM cannot be installed here: {err}")
    try:
        yield running
    finally:
        running.stop()


def job_env(**extra: str) -> dict[str, str]:
    """The script's defaults (HAI_ROOT = submit dir = the repo) unless the repo has no .venv of its own."""
    env = {} if (ROOT / ".venv" / "bin" / "python").exists() else {"HAI_PYTHON": sys.executable}
    return {**env, **extra}


def test_two_nodes_two_ranks_each_rendezvous_and_all_reduce(cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    job = cluster.sbatch(SCRIPT, ["--out", str(out)], ["--nodes=2"], tmp_path / "job.out", cwd=ROOT,
                         env=job_env(**PROBE))
    assert job.returncode == 0 and job.state == "COMPLETED", f"{job}\n{cluster.logs()}"
    assert f"2 node(s) x 2 rank(s), rendezvous {cluster.nodes[0]}:" in job.output
    records = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    assert {(r["node_rank"], r["local_rank"]) for r in records} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(r["world_size"] == 4 and r["sum"] == 6 for r in records)
    assert all(r["slurm_job_id"] == str(job.job_id) for r in records)


def test_trainer_one_process(cluster: SlurmCluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={run}"]
    job = cluster.sbatch(SCRIPT, overrides, ["--nodes=1"], tmp_path / "job.out", cwd=ROOT,
                         env=job_env(GPUS_PER_NODE="1"), timeout=180)
    assert job.returncode == 0 and job.state == "COMPLETED", job.output[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2]
    assert "-m trainer.train" in job.output


def test_failing_rank_fails_the_job_without_hanging(cluster: SlurmCluster, tmp_path: Path) -> None:
    # rank 3 lives on the second node; ranks 0-2 wait in an all-reduce it never joins
    job = cluster.sbatch(SCRIPT, ["--out", str(tmp_path / "probe"), "--fail-rank", "3"], ["--nodes=2"],
                         tmp_path / "job.out", cwd=ROOT, env=job_env(**PROBE), timeout=90)
    assert job.returncode != 0, job.output[-3000:]
    assert job.state == "FAILED", job.output[-3000:]
    assert "dist_probe: rank 3 fails on purpose" in job.output
    assert job.seconds < 60
