"""The GPU smoke kit (DESIGN.md "Tests": gpu): every test here is marked `gpu` and skipped, with the reason, without
CUDA. `make gpu-smoke` runs the kit on one GPU; the figures each test measures go into
bench/results/gpu_smoke.json (the `smoke` fixture), next to the device they were measured on."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_smoke.json"
_FIGURES: dict[str, object] = {}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="no CUDA device (the GPU smoke kit: make gpu-smoke on a GPU machine)")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smoke():
    """A dict the tests put their figures in; written to bench/results/gpu_smoke.json at the end of the session."""
    yield _FIGURES
    if _FIGURES and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record = {"device": f"{props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)",
                  "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                  **_FIGURES}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=1, default=str) + "\n")
