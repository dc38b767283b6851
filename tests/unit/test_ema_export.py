"""EMA (trainer/ema.py) against a float64 reference, and hai-export (trainer/export.py) back through load_hf."""

from __future__ import annotations

import pytest
import torch

from model import Transformer
from model.hf import load_hf
from tests.conftest import small_config
from trainer.checkpoint import save_checkpoint
from trainer.config import RunConfig
from trainer.ema import EMA
from trainer.export import main as export_main


def test_ema_matches_float64_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).bfloat16())
    decay = 0.9
    ema = EMA(model, decay)
    reference = {n: p.detach().double() for n, p in model.named_parameters()}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)  # the average runs on the worker while we compute the reference
        for n, p in model.named_parameters():
            reference[n] = decay * reference[n] + (1 - decay) * p.detach().double()
    state = ema.state_dict()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    for n, ref in reference.items():
        torch.testing.assert_close(state[n].double(), ref, rtol=1e-6, atol=1e-6)

    restored = EMA(model, decay)
    restored.load_state_dict({n: t.clone() for n, t in state.items()})
    assert all(torch.equal(restored.state_dict()[n], t) for n, t in state.items())
    restored.copy_to(model)
    assert torch.equal(model[0].weight, state["0.weight"])
    with pytest.raises(KeyError, match="missing"):
        restored.load_state_dict({"0.weight": state["0.weight"]})


def write_checkpoint(run_dir, with_ema: bool):
    cfg = small_config()
    torch.manual_seed(1)
    model = Transformer(cfg)
    tensors = {"model": model.state_dict()}
    if with_ema:
        ema = EMA(model, 0.5)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        ema.update(model)
        tensors = {"model": model.state_dict(), "ema": ema.state_dict()}
    meta = {"config": RunConfig(model=cfg).to_dict(), "layout": {"pp": 1, "ep": 1, "dp": 1}}
    save_checkpoint(run_dir, 10, tensors, meta, keep=1)
    return {group: {n: t.clone() for n, t in named.items()} for group, named in tensors.items()}


def test_export_model_and_ema_weights(tmp_path, capsys):
    saved = write_checkpoint(tmp_path / "run", with_ema=True)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "step 10" in capsys.readouterr().out
    loaded = load_hf(tmp_path / "hf").state_dict()
    assert loaded.keys() == saved["model"].keys()
    assert all(torch.equal(loaded[n], t) for n, t in saved["model"].items())

    step_dir = tmp_path / "run" / "checkpoints" / "step_00000010"
    assert export_main([str(step_dir), str(tmp_path / "hf_ema"), "--ema"]) == 0
    loaded = load_hf(tmp_path / "hf_ema").state_dict()
    averaged = {**saved["model"], **saved["ema"]}  # buffers (router biases) from the model group
    assert all(torch.equal(loaded[n], t) for n, t in averaged.items())
    assert not torch.equal(loaded["embed.weight"], saved["model"]["embed.weight"])


def test_export_errors_exit_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert export_main([str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1

    write_checkpoint(tmp_path / "run", with_ema=False)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert "step_00000010" in err and "no EMA" in err and "trainer.ema_decay" in err

    model_file = tmp_path / "run" / "checkpoints" / "step_00000010" / "rank_00000.safetensors"
    model_file.write_bytes(b"x" * model_file.stat().st_size)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert str(model_file) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
