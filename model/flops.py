"""Model FLOPs per token: the one analytic count used by the trainer (tflops_per_device, mfu), the planner
(launch/cost.py, hai-plan) and the benches.

What is counted: the multiply-adds of every GEMM a token goes through, 2 FLOPs each, and of core attention:

    MLA      W_DQ d d'_c + W_UQ d'_c H d_qk (W_Q d H d_qk without a query latent) + W_DKV d (d_c + d_R)
             + W_UKV d_c H (d_nope + d_v) + W_O H d_v d
    core     QK^T H d_qk and PV H d_v per (query, key) pair; causal: query i sees i + 1 keys, (T + 1) / 2 on average
             (packed documents attend across each other, paper 4.2, so the whole lower triangle is real work)
    dense    W1, W3, W2: 3 d I
    MoE      router d E (fp32), shared experts 3 d (N_s I_e), the K routed experts 3 K d I_e
    head     d V, once for the main model and once per MTP depth (the head is shared, paper 2.2)
    MTP      per depth: M_k (2d x d), one Transformer block (MoE unless its index < first_k_dense), the head

Not counted: the embedding (a lookup), norms, RoPE, SwiGLU's elementwise products, softmax, the loss, the router's
top-k and the balance losses; at 671B their sum is well under 1% of the GEMMs. Training = forward + backward = 3 x
forward (backward runs two GEMMs per forward GEMM, input and weight gradients; attention's backward likewise runs
twice its forward matmuls). Work repeated by activation recompute (paper 3.2.3) is not model FLOPs: it is
reported on its own (`recompute_flops_per_token`), so that MFU stays comparable across memory settings.

Profilers undercount these models: torch's FlopCounterMode has no formula for grouped GEMMs, and its SDPA formula
counts the whole T x T square whatever the mask; tests/unit/test_flops.py pins this count against FlopCounterMode
on a configuration where every op is a plain matmul (every expert active, loop GEMMs), with the square counted.
"""

from __future__ import annotations

from model.config import ModelConfig


def mla_up_macs(cfg: ModelConfig) -> int:
    """Multiply-adds per token of one MLA layer's up-projections (W_UQ, or W_Q without a query latent, and W_UKV):
    the projections `recompute_mla_up_proj` runs again."""
    h = cfg.n_heads
    q = (cfg.dim if cfg.q_lora_rank is None else cfg.q_lora_rank) * h * cfg.qk_head_dim
    return q + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)


def mla_gemm_macs(cfg: ModelConfig) -> int:
    """Multiply-adds per token of one MLA layer's projections (not the core attention): W_DQ, W_DKV (with W_KR),
    the up-projections and W_O."""
    down = (cfg.q_lora_rank or 0) * cfg.dim + cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return down + mla_up_macs(cfg) + cfg.n_heads * cfg.v_head_dim * cfg.dim


def attention_core_macs(cfg: ModelConfig, keys_per_query: float) -> float:
    """Multiply-adds per token of one layer's QK^T and PV over `keys_per_query` keys."""
    return cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys_per_query


def ffn_macs(cfg: ModelConfig, moe: bool) -> dict[str, int]:
    """Multiply-adds per token of one FFN: a dense SwiGLU, or a MoE's router, shared and routed experts."""
    if not moe:
        return {"dense_ffn": 3 * cfg.dim * cfg.inter_dim}
    return {"router": cfg.dim * cfg.n_routed_experts,
            "shared_experts": 3 * cfg.dim * cfg.n_shared_experts * cfg.moe_inter_dim,
            "routed_experts": 3 * cfg.n_activated_experts * cfg.dim * cfg.moe_inter_dim}


def forward_flops(cfg: ModelConfig, seq_len: int, keys_per_query: float | None = None) -> dict[str, float]:
    """Forward FLOPs per token by component (keys: attention, attention_core, dense_ffn, router, shared_experts,
    routed_experts, head, mtp). `keys_per_query` defaults to the causal average (seq_len + 1) / 2; pass seq_len to
    count the full square (what FlopCounterMode counts for SDPA)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    keys = (seq_len + 1) / 2 if keys_per_query is None else keys_per_query
    out = dict.fromkeys(("attention", "attention_core", "dense_ffn", "router", "shared_experts", "routed_experts",
                         "head", "mtp"), 0.0)

    def block(layer: int, into: dict[str, float]) -> None:
        into["attention"] += 2 * mla_gemm_macs(cfg)
        into["attention_core"] += 2 * attention_core_macs(cfg, keys)
        for name, macs in ffn_macs(cfg, layer >= cfg.first_k_dense).items():
            into[name] += 2 * macs

    for layer in range(cfg.n_layers):
        block(layer, out)
    out["head"] = 2.0 * cfg.dim * cfg.vocab_size
    for depth in range(cfg.n_mtp_depth):
        mtp = dict.fromkeys(out, 0.0)
        block(cfg.n_layers + depth, mtp)
        out["mtp"] += sum(mtp.values()) + 2 * (2 * cfg.dim * cfg.dim) + 2 * cfg.dim * cfg.vocab_size
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward; MTP included when the model has it; recompute
    not counted) of `cfg` on sequences of `seq_len` tokens."""
    return 3 * sum(forward_flops(cfg, seq_len).values())


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Extra FLOPs per token that activation recompute adds in backward (not model FLOPs): with
    `recompute_mla_up_proj`, W_UQ, W_UKV and the core attention run forward again (model/mla.py) in every block,
    the MTP blocks' included; `recompute_norm` repeats only elementwise work, which is not counted."""
    if not cfg.recompute_mla_up_proj:
        return 0.0
    blocks = cfg.n_layers + cfg.n_mtp_depth
    return blocks * 2 * (mla_up_macs(cfg) + attention_core_macs(cfg, (seq_len + 1) / 2))


__all__ = ["flops_per_token", "forward_flops", "recompute_flops_per_token"]
