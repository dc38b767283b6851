"""One run directory per run (trainer/rundir.py): Hydra's output directory on rank 0 only, and each rank's console
copied into its log there, failures included."""

from __future__ import annotations

import pytest

from trainer.rundir import _hydra_run_dir, rank_log


def test_only_rank_0_gets_a_directory_from_hydra(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert _hydra_run_dir(None, "runs/tiny/t0") == "runs/tiny/t0"
    assert _hydra_run_dir("/fixed", "runs/tiny/t0") == "/fixed"
    monkeypatch.setenv("RANK", "0")
    assert _hydra_run_dir(None, "runs/tiny/t0") == "runs/tiny/t0"
    monkeypatch.setenv("RANK", "3")  # another rank's clock may give another time: it makes nothing
    assert _hydra_run_dir(None, "runs/tiny/t1") == "." and _hydra_run_dir("/fixed", "x") == "."


def test_rank_log_copies_the_console_and_the_failure(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="boom"), rank_log(tmp_path / "run", 2) as path:
        print("step 1/3 | loss 9.0")
        raise RuntimeError("boom")
    assert path == tmp_path / "run" / "train.rank2.log"
    text = path.read_text()
    assert "step 1/3 | loss 9.0" in text and "Traceback" in text and "RuntimeError: boom" in text
    assert "step 1/3" in capsys.readouterr().out  # still on the console
    with rank_log(tmp_path / "run", 2):
        print("resumed")
    assert path.read_text().startswith(text) and path.read_text().endswith("resumed\n")  # appended
