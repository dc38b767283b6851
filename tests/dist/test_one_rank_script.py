"""The GPU smoke kit's one-rank script (tests/gpu/nccl_one_rank.py) on the CPU with gloo, so that the script a GPU
session runs once is known to work: the same dispatcher, ZeRO, metric, balancer and checkpoint calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "nccl_one_rank.py"


def test_one_rank_script_runs_on_gloo(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "cpu"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    checked = json.loads(result.stdout.strip().splitlines()[-1])
    assert len([k for k in checked if k.startswith("dispatcher")]) == 4
    assert "rank_00000.safetensors" in checked["checkpoint"] and checked["zero_grad_norm"] > 0
    assert checked["flight_recorder"]["hang_gloo_rank_0"] > 0
