"""The package installed as a user installs it: a wheel built from this checkout (`pip install .`, not editable)
in a fresh virtual environment, then hai-train and hai-plan run from another directory, finding the configs
through the installed package rather than the source tree.

To stay fast and offline the fresh environment reaches the dependencies (torch, hydra, ...) already installed in
the test's own environment through a .pth file; the project itself exists there only as the wheel's copy, which
the test checks by asking the installed modules where they live.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.n_layers=2", "model.dim=64", "model.vocab_size=512", "model.n_routed_experts=8", "model.n_group=4",
         "model.topk_group=2", "model.n_activated_experts=2", "model.inter_dim=128", "model.moe_inter_dim=32",
         "data.vocab_size=512", "data.corpus_bytes=300000", "data.seq_len=32", "trainer.micro_batch_size=4",
         "trainer.eval_every=0", "logging.plot=false"]


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_from_another_directory(tmp_path: Path) -> None:
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a copy of the checkout, so that setuptools' in-tree build directory can hold nothing stale
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                             "multirun", "__pycache__", ".pytest_cache", "results"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels),
          str(src)], cwd=tmp_path)
    wheel = next(wheels.glob("hai_llm-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    # the dependencies, without this project's editable install (its finder is only activated by its own .pth)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], cwd=tmp_path, env=env)
    probe = "import json, configs, trainer; print(json.dumps([str(configs.ROOT), trainer.__file__]))"
    where = json.loads(_run([str(python), "-c", probe], cwd=elsewhere, env=env).stdout)
    assert all(p.startswith(str(site)) for p in where), where  # the wheel's copy, not the checkout

    run = elsewhere / "run"
    out = _run([str(venv / "bin" / "hai-train"), *SMALL, "trainer.max_steps=3", f"trainer.run_dir={run}",
                f"data.cache_dir={tmp_path / 'cache'}"], cwd=elsewhere, env=env).stdout
    assert "step 3/3" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in elsewhere.iterdir()) == ["run"]  # nothing written next to it
    plan = _run([str(venv / "bin" / "hai-plan"), "model=deepseek_v3_671b", "parallel.pp=16", "parallel.ep=64",
                 "parallel.schedule=dualpipe", "--fp8", "--cluster", "h800_2048"], cwd=elsewhere, env=env).stdout
    assert "(671.0B)" in plan and "fits: heaviest rank" in plan  # the shipped cluster file was found
