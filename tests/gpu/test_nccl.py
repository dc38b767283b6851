"""(d) tests/gpu/nccl_one_rank.py in a fresh process: one rank on a real NCCL group checks the devices of every
collective the trainer makes (dispatcher, ZeRO-1, metrics, bias balancer, checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("nccl_one_rank.py")


def test_one_rank_on_nccl(tmp_path, smoke):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "cuda"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checked = json.loads(result.stdout.strip().splitlines()[-1])
    assert len([k for k in checked if k.startswith("dispatcher")]) == 4 and "rank_00000.safetensors" in \
        checked["checkpoint"]
    smoke["nccl_one_rank"] = checked
