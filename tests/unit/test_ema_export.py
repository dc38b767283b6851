"""EMA (trainer/ema.py) against a float64 reference, whole and as ZeRO-1 ranges, and hai-export (trainer/export.py)
back through load_hf. The multi-rank EMA and its export: tests/dist/test_ema_dist.py."""

from __future__ import annotations

import pytest
import torch

from model import Transformer
from tests.conftest import small_config
from trainer.checkpoint import save_checkpoint
from trainer.config import RunConfig
from trainer.ema import EMA
from trainer.export import main as export_main
from trainer.hf import load_hf


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


def test_ema_of_owned_ranges_equals_the_whole_ema_there():
    """An EMA keeping ranges (as a ZeRO-1 rank: part of one parameter, all of another, none of a third) holds
    exactly the whole EMA's values there, NaN elsewhere in its parameter-shaped state, and loads back only its
    ranges."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    owned = {"0.weight": (5, 12), "0.bias": (0, 3)}
    whole, part = EMA(model, 0.8), EMA(model, 0.8, owned=owned)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        whole.update(model)
        part.update(model)
    full, state = whole.state_dict(), part.state_dict()
    assert state.keys() == owned.keys() and not part.whole and whole.whole
    assert part.nbytes() == 4 * (7 + 3) and whole.nbytes() == 4 * sum(p.numel() for p in model.parameters())
    assert torch.equal(state["0.bias"], full["0.bias"])
    flat = state["0.weight"].reshape(-1)
    assert torch.equal(flat[5:12], full["0.weight"].reshape(-1)[5:12]) and flat[:5].isnan().all()
    assert flat[12:].isnan().all() and state["0.weight"].shape == (3, 4)
    assert {n: (a, t.numel()) for n, (a, t) in part.pieces().items()} == {"0.weight": (5, 7), "0.bias": (0, 3)}

    restored = EMA(model, 0.8, owned=owned)
    restored.load_state_dict({n: full[n].clone() for n in owned})  # e.g. read from a checkpoint of another layout
    assert all(torch.equal(restored.pieces()[n][1], t) for n, (_, t) in part.pieces().items())
    with pytest.raises(ValueError, match="hai-export --ema"):
        part.copy_to(model)
    with pytest.raises(KeyError, match="differ"):
        part.update(torch.nn.Sequential(torch.nn.Linear(4, 3)))


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


def test_export_of_an_incomplete_ema_names_the_missing_tensors(tmp_path, capsys):
    cfg = small_config()
    model = Transformer(cfg)
    ema = {n: t for n, t in EMA(model, 0.5).state_dict().items() if n != "embed.weight"}
    meta = {"config": RunConfig(model=cfg).to_dict(), "layout": {"pp": 1, "ep": 1, "dp": 1}}
    save_checkpoint(tmp_path / "run", 10, {"model": model.state_dict(), "ema": ema}, meta, keep=1)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert "missing ['embed.weight']" in err and "export without --ema" in err
