"""Run configuration: every group's YAML mirrors its dataclass, cross-group rules, and the bias loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from model import ConfigError, Transformer
from model.moe import update_bias
from tests.conftest import small_config
from trainer.balance import BiasBalancer, max_violation
from trainer.config import GROUPS, compose_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose_run(overrides: list[str]):
    return compose_config(overrides)


@pytest.mark.parametrize("group", sorted(set(GROUPS) - {"model", "experiment"}))
def test_group_yaml_mirrors_its_dataclass(group):
    fields = {f.name for f in dataclasses.fields(GROUPS[group])}
    files = sorted((CONFIGS / group).glob("*.yaml"))
    assert files
    for path in files:
        assert set(OmegaConf.load(path).keys()) == fields, path.name


@pytest.mark.parametrize("experiment,world", [("tiny", 1), ("deepseek_v3", 1), ("tiny_parallel", 4)])
def test_experiments_compose_and_validate(experiment, world):
    cfg = load_config(compose_run([f"experiment={experiment}"]), world_size=world)
    assert cfg.experiment.name == experiment


def test_deepseek_v3_experiment_holds_the_paper_recipe():
    cfg = load_config(compose_run(["experiment=deepseek_v3"]))
    assert cfg.model.n_layers == 61 and cfg.data.seq_len == 4096 and cfg.trainer.dtype == "bf16"
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (2.2e-4, 2.2e-5, 0.1, 1.0)
    assert (cfg.optim.batch_ramp_start, cfg.trainer.global_batch_size) == (3072, 15360)
    assert cfg.optim.moment_dtype == "bf16" and cfg.optim.bias_gamma == 1e-3


@pytest.mark.parametrize("overrides,words", [
    (["trainer.global_batch_size=12", "trainer.micro_batch_size=8"], "trainer.global_batch_size"),
    (["data.seq_len=1024"], "model.max_seq_len"),
    (["trainer.dtype=fp16"], "trainer.dtype"),
    (["parallel.pp=2"], "parallel.pp"),
    (["+optim.momentum=0.9"], "momentum"),
])
def test_inconsistent_run_config_names_the_field(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(compose_run(overrides))


def test_unknown_group_is_named():
    with pytest.raises(ConfigError, match="schedule"):
        load_config({"schedule": {}})


def test_bias_balancer_applies_the_sign_rule_to_every_router_and_resets():
    torch.manual_seed(0)
    model = Transformer(small_config(n_layers=3, first_k_dense=1))
    tokens = torch.randint(0, 101, (2, 16))
    model.loss(tokens, tokens, mtp_lambda=0.3).loss.backward()
    gates = {n: m for n, m in model.named_modules() if n.endswith("ffn.gate")}
    assert len(gates) == 3  # two MoE layers and the MTP block
    loads = {n: g.tokens_per_expert.clone() for n, g in gates.items()}
    biases = {n: g.bias.clone() for n, g in gates.items()}
    result = BiasBalancer(model, update=True).step(gamma=0.01)
    for name, gate in gates.items():
        assert torch.equal(gate.bias, update_bias(biases[name], loads[name], 0.01))
        assert gate.tokens_per_expert.sum() == 0
        assert result["maxvio_layer"][name] == max_violation(loads[name])
    assert result["maxvio"] == pytest.approx(sum(result["maxvio_layer"].values()) / 3)


def test_bias_balancer_without_update_only_measures():
    torch.manual_seed(1)
    model = Transformer(small_config())
    model.loss(torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8))).loss.backward()
    BiasBalancer(model, update=False).step(gamma=0.01)
    assert all(m.bias.abs().sum() == 0 for n, m in model.named_modules() if n.endswith("ffn.gate"))


def test_max_violation_definition():
    assert max_violation(torch.tensor([2.0, 2.0, 2.0, 2.0])) == 0.0
    assert max_violation(torch.tensor([4.0, 0.0, 2.0, 2.0])) == pytest.approx(1.0)
