"""Config validation errors name the field and the fix; presets mirror the dataclass; parameter counts
match the paper (671B / 37B) and the materialised model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from model import ConfigError, ModelConfig, Transformer, count_params, presets
from tests.conftest import small_config


@pytest.mark.parametrize("overrides,field,words", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts", "divisible by n_group"),
    (dict(topk_group=5, n_group=4), "topk_group", "n_group=4"),
    (dict(n_activated_experts=5, n_group=4, topk_group=2), "n_activated_experts", "topk_group"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim", "even"),
    (dict(n_mtp_depth=-1), "n_mtp_depth", ">= 0"),
    (dict(balance="sometimes"), "balance", "aux_free"),
    (dict(first_k_dense=7), "first_k_dense", "n_layers"),
    (dict(q_lora_rank=0), "q_lora_rank", "null"),
    (dict(n_group=8, topk_group=2), "n_group", ">= 2 experts"),
])
def test_inconsistent_config_names_field_and_constraint(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        small_config(**overrides)
    assert f"model.{field}" in str(err.value) and words in str(err.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        presets.load("deepseek_v4")
    for name in ("tiny", "small", "deepseek_v3_671b"):
        assert name in str(err.value)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="n_experts"):
        presets.load("tiny", n_experts=4)


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek_v3_671b"])
def test_preset_yaml_mirrors_the_dataclass(name):
    keys = set(OmegaConf.load(presets.CONFIG_DIR / f"{name}.yaml").keys())
    assert keys == {f.name for f in dataclasses.fields(ModelConfig)}


def test_671b_preset_holds_the_paper_values():
    cfg = presets.load("deepseek_v3_671b")
    assert (cfg.n_layers, cfg.dim, cfg.first_k_dense, cfg.inter_dim) == (61, 7168, 3, 18432)
    assert (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 128, 64, 128)
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.vocab_size, cfg.init_std) == (512, 1536, 129280, 0.006)
    assert (cfg.n_shared_experts, cfg.n_routed_experts, cfg.moe_inter_dim, cfg.n_activated_experts) == (1, 256, 2048, 8)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.n_mtp_depth) == (8, 4, 2.5, 1)
    assert cfg.seq_aux_alpha == 1e-4 and cfg.balance == "aux_free"


def test_671b_parameter_count_matches_the_paper():
    counts = count_params(presets.load("deepseek_v3_671b"))
    assert abs(counts["total"] / 671e9 - 1) < 0.005
    assert abs(counts["activated"] / 37e9 - 1) < 0.015
    assert 10e9 < counts["mtp"] < 14e9  # one MoE block + eh_proj; shares embedding and head


def test_small_preset_is_between_1_and_3_billion():
    assert 1e9 <= count_params(presets.load("small"))["total"] <= 3e9


def test_count_params_equals_a_materialised_model():
    cfg = small_config()
    torch.manual_seed(0)
    model = Transformer(cfg)
    counts = count_params(cfg)
    n_main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert counts["total"] == n_main
    assert counts["mtp"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp."))
    per_token = routed // cfg.n_routed_experts * cfg.n_activated_experts
    assert counts["activated"] == n_main - model.embed.weight.numel() - routed + per_token
