"""The host-sync counter (core/syncs.py) and the budget in one process: a MoE layer's forward and backward
without expert parallelism make the host wait for the device not once (router and expert counts on the device,
the expert GEMM sized from the device), and a step reads its values once each. tests/dist/test_devices.py holds
the same on the main job's layout."""

from __future__ import annotations

import pytest
import torch

from core.syncs import HostSyncCounter
from tests.dist.test_devices import SMALL, STEP_READS, steps_on_meta


def test_the_counter_sees_what_syncs_on_cuda_and_nothing_else():
    x = torch.arange(6.0)
    with HostSyncCounter(where=True) as c:
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        int(x[1])
        x.nonzero()
        torch.bincount(x.long())
        x.cpu()
        torch.repeat_interleave(x, torch.tensor([1, 2, 1, 2, 1, 2]))
        _ = x * 2 + x.cumsum(0) + torch.repeat_interleave(x, 2).sum()  # device work: no sync
        torch.repeat_interleave(x, 2, output_size=12)
        x.index_add_(0, torch.tensor([0, 1]), torch.ones(2))
    assert c.counts == {"item": 1, "tolist": 1, "__bool__": 1, "__int__": 1, "nonzero": 1, "bincount": 1,
                        "cpu": 1, "repeat_interleave": 1}
    assert all("test_host_syncs.py" in site for site in c.sites)


@pytest.mark.parametrize("fp8,per_pass", [("off", 0), ("emulate", 1)])
def test_one_process_keeps_the_budget_and_names_every_device(tmp_path, fp8, per_pass):
    """bf16/fp32 expert GEMMs need no host sizes; the per-expert FP8 GEMMs read them once per layer (what the
    expert-parallel dispatch's counts exchange gives for free)."""
    r = steps_on_meta([*SMALL, "trainer.micro_batch_size=4", f"fp8={fp8}", f"data.cache_dir={tmp_path / 'cache'}"],
                      1, tmp_path / "run")
    assert r["got"] == r["expected"] and r["val"][0] == r["val"][1]
    assert r["passes"] == 2 * 4  # 3 MoE layers + the MTP block's, per micro-batch: 2 micro-batches
    assert r["micro"] == per_pass * r["passes"], r["micro_sites"]
    assert r["rest"] <= STEP_READS, r["rest_calls"]
