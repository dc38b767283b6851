"""model/flops.py, the one FLOPs-per-token count: against hand arithmetic on small configs, against torch's
FlopCounterMode on configurations where every op is a plain matmul (every expert active, loop GEMMs), and
against the planner's per-stage count; recompute is counted apart."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import Transformer, presets
from model.config import ModelConfig
from model.flops import flops_per_token, forward_flops, recompute_flops_per_token

HAND = ModelConfig(vocab_size=100, dim=8, n_layers=3, first_k_dense=1, inter_dim=12, max_seq_len=64, n_heads=2,
                   q_lora_rank=4, kv_lora_rank=6, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=5,
                   n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_group=1, topk_group=1,
                   moe_inter_dim=7, n_mtp_depth=1).validate()


def test_hand_computed_small_config():
    """Every product written out for HAND (d 8, H 2, d_qk 3 + 2, d_v 5, latents 4 / 6, I 12, I_e 7, E 4, K 2,
    V 100, 1 dense + 2 MoE layers, MTP depth 1) at T = 9: 5 keys per query on average."""
    mla = 8 * 4 + 4 * 2 * 5 + 8 * (6 + 2) + 6 * 2 * (3 + 5) + 2 * 5 * 8  # W_DQ, W_UQ, W_DKV, W_UKV, W_O = 328
    core = 2 * (5 + 5) * 5  # QK^T + PV over 5 keys = 100
    dense = 3 * 8 * 12  # 288
    moe = 8 * 4 + 3 * 8 * 7 + 2 * 3 * 8 * 7  # router, shared, 2 routed = 536
    head = 8 * 100
    main = 3 * (mla + core) + dense + 2 * moe + head
    mtp = 2 * 8 * 8 + (mla + core) + moe + head
    assert flops_per_token(HAND, 9) == 3 * 2 * (main + mtp)
    parts = forward_flops(HAND, 9)
    assert parts["router"] == 2 * 2 * 8 * 4 and parts["dense_ffn"] == 2 * dense and parts["head"] == 2 * head
    assert parts["mtp"] == 2 * mtp


def test_no_query_latent_no_shared_experts_no_mtp():
    cfg = dataclasses.replace(HAND, q_lora_rank=None, n_shared_experts=0, n_mtp_depth=0, first_k_dense=0)
    mla = 8 * 2 * 5 + 8 * (6 + 2) + 6 * 2 * (3 + 5) + 2 * 5 * 8  # W_Q directly
    core = 2 * (5 + 5) * (16 + 1) / 2
    moe = 8 * 4 + 2 * 3 * 8 * 7
    assert flops_per_token(cfg, 16) == 3 * 2 * (3 * (mla + core + moe) + 8 * 100)


def dense_experts(cfg: ModelConfig, **changes) -> ModelConfig:
    """`cfg` with every expert active and computed by a plain matmul per expert (`expert_gemm=loop`): each
    token goes to all E experts, so the routed count K = E is exact and FlopCounterMode sees only mm/bmm."""
    return dataclasses.replace(cfg, n_activated_experts=cfg.n_routed_experts, n_group=1, topk_group=1,
                               expert_gemm="loop", **changes).validate()


def counted_training_flops(cfg: ModelConfig, batch: int, seq: int) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(cfg.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(tokens, tokens, mtp_lambda=0.3 if cfg.n_mtp_depth else 0.0).loss.backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / (batch * seq), ops


TINY = presets.load("tiny")


@pytest.mark.parametrize("changes", [
    {},
    {"q_lora_rank": None, "n_shared_experts": 0},
    {"first_k_dense": 0, "n_mtp_depth": 2},
    {"first_k_dense": 2, "n_mtp_depth": 0, "n_shared_experts": 2},
], ids=["tiny", "no-q-latent-no-shared", "all-moe-mtp2", "dense2-no-mtp"])
def test_agrees_with_flop_counter_mode(changes):
    """FlopCounterMode counts mm (every Linear, forward and both backward GEMMs) and bmm (the CPU SDPA math
    kernel's QK^T and PV, the whole T x T square, masked half included); with the square counted, the analytic
    training count equals it exactly. Nothing else in the step is a matmul (the counter sees only these two)."""
    cfg = dense_experts(TINY, **changes)
    seq = 24
    counted, ops = counted_training_flops(cfg, 2, seq)
    assert set(ops) == {"aten.mm", "aten.bmm"}, ops
    assert counted == 3 * sum(forward_flops(cfg, seq, keys_per_query=seq).values())
    # causal: (seq + 1) / 2 keys instead of seq in every block's QK^T and PV, the MTP blocks' included
    masked_half = 3 * (cfg.n_layers + cfg.n_mtp_depth) * 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (
        seq - (seq + 1) / 2)
    assert math.isclose(flops_per_token(cfg, seq), counted - masked_half, rel_tol=1e-12)


def test_recompute_is_counted_apart():
    """recompute_mla_up_proj reruns W_UQ, W_UKV and the core attention of every block in backward: the counter
    sees that much more (square attention, as it counts), less one matmul: torch's non-reentrant checkpoint stops
    recomputing once every tensor backward needs is back, and the CPU math kernel's last bmm (P V, whose output
    only the forward used) is then skipped. A fused GPU kernel saves its output, so there the whole core reruns,
    which is what `recompute_flops_per_token` counts. The model FLOPs do not change."""
    cfg = dense_experts(TINY)
    seq = 24
    base, _ = counted_training_flops(cfg, 2, seq)
    recomputed, _ = counted_training_flops(dataclasses.replace(cfg, recompute_mla_up_proj=True), 2, seq)
    extra = recompute_flops_per_token(dataclasses.replace(cfg, recompute_mla_up_proj=True), seq)
    blocks = cfg.n_layers + cfg.n_mtp_depth
    square_extra = extra + blocks * 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq - (seq + 1) / 2)
    skipped_pv = blocks * 2 * cfg.n_heads * cfg.v_head_dim * seq
    assert math.isclose(recomputed - base, square_extra - skipped_pv, rel_tol=1e-12)
    assert flops_per_token(dataclasses.replace(cfg, recompute_mla_up_proj=True), seq) == flops_per_token(cfg, seq)
    assert recompute_flops_per_token(cfg, seq) == 0.0
    assert recompute_flops_per_token(dataclasses.replace(cfg, recompute_norm=True), seq) == 0.0


@pytest.mark.parametrize("fp8", [False, True])
def test_planner_uses_the_same_count(fp8):
    """hai-plan's stage costs split this count by stage and precision: their sum is it, for 671B on PP16 with
    DualPipe (MTP on the last stage) and for a dense-first small model on PP2."""
    from launch.plan import build_plan, load_cluster
    from parallel.config import ParallelConfig

    cluster = load_cluster(None, {})
    for preset, parallel in (("deepseek_v3_671b", ParallelConfig(pp=16, ep=64, schedule="dualpipe")),
                             ("small", ParallelConfig(pp=2, ep=8, schedule="1f1b"))):
        cfg = presets.load(preset)
        plan = build_plan(cfg, parallel, cluster, fp8=fp8, seq_len=2048)
        assert math.isclose(plan.flops_per_token, flops_per_token(cfg, 2048), rel_tol=1e-12)


def test_671b_at_4k_against_the_public_figure():
    """The public figure derived from Megatron's DeepSeek-V3 runs is about 260 GFLOP per token at 4K. Ours, for the
    main model, is 6 x the GEMM weights a token meets (counted here from the modules built on the meta device:
    every Linear, routed experts at K/E, the head) plus 3 x causal attention; the MTP module, which trains with
    it, adds its share (bench/results/flops.md gives the figures)."""
    from model.linear import GroupedLinear, Linear

    cfg = presets.load("deepseek_v3_671b")
    main_cfg = dataclasses.replace(cfg, n_mtp_depth=0)
    with torch.device("meta"):
        model = Transformer(main_cfg)
    weights = sum(m.weight.numel() * (cfg.n_activated_experts / cfg.n_routed_experts
                                      if isinstance(m, GroupedLinear) else 1)
                  for m in model.modules() if isinstance(m, (Linear, GroupedLinear)))
    core = cfg.n_layers * 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (4096 + 1) / 2
    assert math.isclose(flops_per_token(main_cfg, 4096), 6 * weights + 3 * core, rel_tol=1e-12)
    assert abs(flops_per_token(cfg, 4096) / 260e9 - 1) < 0.02


def test_bad_sequence_length():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(TINY, 0)
