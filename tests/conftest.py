"""Shared fixtures: small model configs built in code (tests never depend on preset sizes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import ModelConfig  # noqa: E402


def small_config(**overrides) -> ModelConfig:
    """A 3-layer model with every feature on: MLA with both latents, 1 dense + 2 MoE layers, 4 groups
    of 2 experts, top-3 within 2 groups, a shared expert, MTP depth 1."""
    values = dict(vocab_size=101, dim=32, n_layers=3, first_k_dense=1, inter_dim=48, n_heads=2, q_lora_rank=24,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                  n_shared_experts=1, n_activated_experts=3, n_group=4, topk_group=2, moe_inter_dim=16,
                  max_seq_len=64, init_std=0.1, n_mtp_depth=1)
    values.update(overrides)
    return ModelConfig(**values).validate()


@pytest.fixture
def cfg() -> ModelConfig:
    return small_config()
