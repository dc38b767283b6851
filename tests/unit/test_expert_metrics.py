"""Watching the experts (trainer/balance.py, trainer/metrics.py): per MoE layer and step, MaxVio, idle experts, the
biases' spread and the EP-rank overload against a hand computation; model.force_balance routes round-robin and
says so in every record; expert_load.jsonl / expert_load.png from a real run."""

from __future__ import annotations

import json

import pytest
import torch

from model import Transformer
from model.moe import Gate, gates
from tests.conftest import small_config
from tests.dist.test_train_parallel import config
from trainer.balance import BiasBalancer, layer_stats
from trainer.train import train


def test_layer_stats_by_hand():
    load = torch.tensor([0.0, 6, 2, 0, 4, 12, 0, 8])  # 32 tokens over 8 experts; EP=2: ranks hold [0..3], [4..7]
    bias = torch.tensor([0.5, -1, 0, 0, 0.25, 0, 0, -0.25])
    stats = dict(zip(("maxvio", "idle", "bias_min", "bias_mean", "bias_max", "ep_overload"),
                     layer_stats(load, bias, ep=2).tolist()))
    assert stats["maxvio"] == pytest.approx(12 / 4 - 1)
    assert stats["idle"] == 3
    assert (stats["bias_min"], stats["bias_mean"], stats["bias_max"]) == pytest.approx((-1, -0.5 / 8, 0.5))
    assert stats["ep_overload"] == pytest.approx(24 / 16)  # rank 1 gets 4 + 12 + 0 + 8 of a mean 16
    assert layer_stats(load, bias, ep=1)[-1].item() == 1.0


def test_balancer_reports_every_layer_and_the_step_summaries():
    torch.manual_seed(0)
    model = Transformer(small_config())
    for i, gate in enumerate(gates(model).values()):
        gate.tokens_per_expert.copy_(torch.arange(gate.tokens_per_expert.numel()).float() * (i + 1))
        gate.tokens_per_expert[0] = 0
    loads = {name: g.tokens_per_expert.clone() for name, g in gates(model).items()}
    out = BiasBalancer(model, update=True, ep=2).step(gamma=0.01)
    assert set(out["experts"]) == set(loads) == set(out["maxvio_layer"]) == set(out["expert_loads"])
    for name, load in loads.items():
        bias = dict(gates(model))[name].bias
        assert out["experts"][name]["idle"] == 1
        assert out["experts"][name]["bias_max"] == pytest.approx(bias.max().item())
        assert out["expert_loads"][name] == load.tolist()
    assert out["idle_experts"] == len(loads)
    assert out["ep_overload"] == max(r["ep_overload"] for r in out["experts"].values()) > 1
    assert out["bias_min"] == pytest.approx(-0.01) and out["bias_max"] == pytest.approx(0.01)


def test_force_balance_routes_round_robin():
    cfg = small_config(force_balance=True)
    gate = Gate(cfg)
    scores = torch.rand(6, cfg.n_routed_experts)
    idx = gate.select(scores)
    k, e = cfg.n_activated_experts, cfg.n_routed_experts
    assert idx.tolist() == [[(t * k + j) % e for j in range(k)] for t in range(6)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    run = root / "run"
    train(config([f"data.cache_dir={root / 'cache'}", f"trainer.run_dir={run}", "logging.expert_load_every=2",
                  "logging.plot=true"], 1), run)
    return run


def test_a_run_records_expert_health_and_draws_the_load_heatmap(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert all(r["force_balance"] is False for r in train_records)
    for r in train_records:
        assert set(r["experts"]) == set(r["maxvio_layer"]) and r["idle_experts"] >= 0 and r["ep_overload"] == 1.0
        assert r["bias_min"] <= r["bias_max"] and "expert_loads" not in r
    loads = [json.loads(line) for line in (run / "expert_load.jsonl").read_text().splitlines()]
    assert [x["step"] for x in loads] == [2, 4, 5]  # every 2 steps and the last
    assert all(sum(v) > 0 for x in loads for v in x["loads"].values())
    assert (run / "expert_load.png").stat().st_size > 1000


def test_force_balance_is_stated_and_even(tmp_path, run):
    forced = tmp_path / "forced"
    train(config([f"data.cache_dir={run.parent / 'cache'}", f"trainer.run_dir={forced}", "model.force_balance=true",
                  "trainer.max_steps=2"], 1), forced)
    records = [json.loads(line) for line in (forced / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert train_records and all(r["force_balance"] is True for r in train_records)
    assert all(r["maxvio"] == 0 and r["idle_experts"] == 0 for r in train_records)
