"""`trainer.init_from` into another layout (trainer/init_from.py): a stage-2 run on PP=2 DualPipe x EP=2 x DP=2
started from a one-process stage 1, through its export in DeepSeek's FP8 release form, equals the same stage 2 in
one process (losses within 1e-6 relative). Rank 0 alone reads the export's headers (each file's once) and
broadcasts them; each rank reads only its EP rank's experts (and its stages' layers: with DualPipe at PP=2, all)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.dist.conftest import run_distributed
from tests.dist.test_train_parallel import _train, config, losses

PIPE = ["model.n_layers=4", "trainer.eval_every=0"]
STAGE2 = ["model.yarn={factor:2,original_max_seq_len:32}", "model.max_seq_len=64", "data.seq_len=64",
          "trainer.max_steps=3", "trainer.global_batch_size=8"]


def _train_counting(rank: int, world_size: int, overrides: list[str], run_dir: str) -> None:
    """_train, recording which safetensors headers and tensors of the export this rank read."""
    import trainer.hf as hf

    headers, reads = [], []
    header, read = hf._header, hf.HFReader._read

    def counted_header(file):
        headers.append(Path(file).name)
        return header(file)

    def counted_read(self, name):
        reads.append(name)
        return read(self, name)

    hf._header, hf.HFReader._read = counted_header, counted_read
    _train(rank, world_size, overrides, run_dir)
    (Path(run_dir) / f"export_reads.rank{rank}.json").write_text(json.dumps({"headers": headers, "reads": reads}))


@pytest.mark.slow
def test_stage_two_on_another_layout_from_an_fp8_export_equals_one_process(tmp_path):
    from trainer.export import export
    from trainer.train import train

    cache = tmp_path / "cache"
    stage1 = tmp_path / "stage1"
    train(config(PIPE + [f"data.cache_dir={cache}", "trainer.max_steps=2", f"trainer.run_dir={stage1}"], 1), stage1)
    export(stage1, tmp_path / "fp8", fp8=True)
    common = PIPE + STAGE2 + [f"data.cache_dir={cache}", f"trainer.init_from={tmp_path / 'fp8'}"]
    single = tmp_path / "single"
    train(config(common + ["trainer.micro_batch_size=8", f"trainer.run_dir={single}"], 1), single)
    run = tmp_path / "parallel"
    run_distributed(_train_counting, 4, common + ["parallel.pp=2", "parallel.schedule=dualpipe", "parallel.ep=2",
                                         "parallel.gpus_per_node=2", "trainer.micro_batch_size=1",
                                         f"trainer.run_dir={run}"], str(run), timeout=300)
    files = sorted(p.name for p in (tmp_path / "fp8").glob("*.safetensors"))
    seen = [json.loads((run / f"export_reads.rank{r}.json").read_text()) for r in range(4)]
    assert sorted(seen[0]["headers"]) == files and not any(s["headers"] for s in seen[1:])
    layers = [{int(m) for m in re.findall(r"model\.layers\.(\d+)\.", " ".join(s["reads"]))} for s in seen]
    experts = [{int(m) for m in re.findall(r"\.experts\.(\d+)\.", " ".join(s["reads"]))} for s in seen]
    everything = set().union(*layers)
    assert everything == set(range(5))  # 4 layers and the MTP layer, each read by some rank
    # DualPipe at PP=2 gives each rank a stage of each direction, so both ranks of a pipeline hold every layer
    assert all(mine == everything for mine in layers), layers
    assert all(len(mine) == 4 for mine in experts) and set().union(*experts) == set(range(8)), experts
    got, ref = losses(run), losses(single)
    assert len(got) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    scratch = tmp_path / "scratch"
    train(config([c for c in common if not c.startswith("trainer.init_from")]
                 + ["trainer.micro_batch_size=8", f"trainer.run_dir={scratch}"], 1), scratch)
    assert losses(scratch)[0] != ref[0]  # the weights came from the export
