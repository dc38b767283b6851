"""hai-compare as a user runs it: on the two points of a real 3-step multirun of hai-train, and on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_train import hai_train


def hai_compare(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("hai-compare")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainer.compare"]
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hai_compare_reads_a_real_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    result = hai_train(["-m", "model.balance=aux_free,aux_loss", "trainer.max_steps=3", "trainer.eval_every=3",
                        f"hydra.sweep.dir={sweep}"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]

    shown = hai_compare([str(sweep), "--out", "cmp"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "model.balance=aux_free" in shown.stdout and "model.balance=aux_loss" in shown.stdout
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["overrides"] for r in rows] == [{"model.balance": "aux_free"}, {"model.balance": "aux_loss"}]
    for row, point in zip(rows, ("0", "1")):
        assert row["run"] == str(sweep / point)
        records = [json.loads(line) for line in (sweep / point / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["split"] == "train"]
        valid = [r for r in records if r["split"] == "valid"]
        assert (row["steps"], row["tokens"]) == (3, train[-1]["tokens"])
        assert row["final_val_loss"] == row["best_val_loss"] == valid[-1]["val_loss"]
        last = train[-1]  # 10% of 3 records: the last one
        assert (row["train_loss_last10"], row["maxvio_last10"], row["tokens_per_s"]) == \
            (last["loss"], last["maxvio"], last["tokens_per_s"])
        assert row["delta_final_val_loss"] == row["final_val_loss"] - rows[0]["final_val_loss"]
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cmp" / "compare.md").exists()

    bad = hai_compare([str(tmp_path / "cache")], tmp_path)
    assert bad.returncode == 2 and "holds no run" in bad.stderr and "Traceback" not in bad.stderr
