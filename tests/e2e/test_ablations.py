"""bench/ablations.py in its 2-point, 3-step version (the MTP ablation, one seed, the e2e tests' small model): the
multirun, hai-compare's rows recomputed from each point's metrics.jsonl, and ablations.md with the paper's
direction and a verdict."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from tests.e2e.test_train import FAST, ROOT


@pytest.mark.slow
def test_two_point_ablation_compares_its_runs(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    extra = [a for a in FAST if not a.startswith(("trainer.eval_every", "logging."))] + [
        f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "bench.ablations", "--only", "mtp", "--seeds", "1", "--steps", "3", "--jobs", "1",
           "--out", str(out), "--runs", str(runs), "--extra", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    rows = json.loads((out / "ablations" / "mtp" / "compare.json").read_text())["rows"]
    assert [r["overrides"] for r in rows] == [{"model.n_mtp_depth": 0}, {"model.n_mtp_depth": 1}]
    for row, point in zip(rows, ("0", "1")):
        records = [json.loads(line) for line in (runs / "mtp" / point / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["split"] == "train"]
        valid = [r["val_loss"] for r in records if r["split"] == "valid"]
        tail = train[-max(1, math.ceil(len(train) / 10)):]
        assert row["n_seeds"] == 1 and row["steps"] == 3 and row["tokens"] == train[-1]["tokens"]
        assert row["final_val_loss"] == valid[-1] and row["best_val_loss"] == min(valid)
        assert row["train_loss_last10"] == statistics.mean(r["loss"] for r in tail)
        assert row["maxvio_last10"] == statistics.mean(r["maxvio"] for r in tail)
    md = (out / "ablations.md").read_text()
    assert "## mtp" in md and "Table 4" in md and "validation loss lower with MTP:" in md
    assert "one seed: no spread" in md  # one seed: the verdict says it cannot judge the spread
    assert (out / "ablations" / "mtp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "ablations.json").read_text())
    assert summary["steps"] == 3 and list(summary["ablations"]) == ["mtp"]
