"""The planner's activation formula (launch/cost.py: `layer_activation_bytes`, `head_activation_bytes`) against
the bytes autograd really saves (launch/activations.py, saved-tensor hooks), within 10% at small configs, dense
and MoE blocks, with and without FP8 and recompute, for both attention kernels the CPU runs."""

from __future__ import annotations

import pytest
import torch

from fp8.config import FP8Config
from fp8.recipe import apply_fp8
from launch.activations import cpu_attention, saved_bytes_per_token
from launch.cost import head_activation_bytes, layer_activation_bytes
from model import Transformer
from model.presets import load
from trainer.train import cast_for_compute

TOKENS = 128
CASES = {
    "tiny": {},  # q and v head widths differ: CPU SDPA's math kernel (T x T probabilities saved)
    "tiny, one head width": {"qk_nope_head_dim": 16},  # d_qk = d_v: CPU SDPA's flash kernel (the GPU's kind)
    "tiny, recompute": {"recompute_norm": True, "recompute_mla_up_proj": True},
    "tiny, recompute_norm": {"recompute_norm": True},
    "tiny, no q latent, aux loss, no shared": {"q_lora_rank": None, "balance": "aux_loss", "n_shared_experts": 0},
}


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("case", CASES)
def test_block_activation_formula_matches_saved_tensors(case, fp8):
    cfg = load("tiny", **CASES[case])
    attention = cpu_attention(cfg)
    assert attention == ("fused" if case == "tiny, one head width" else "math")
    for layer in (0, cfg.first_k_dense):
        measured = saved_bytes_per_token(cfg, layer, fp8, TOKENS)
        planned = layer_activation_bytes(cfg, layer >= cfg.first_k_dense, fp8, attention, TOKENS)
        assert abs(measured / planned - 1) < 0.10, (layer, measured, planned)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
def test_whole_model_activation_formula_matches_saved_tensors(fp8, recompute):
    """Embedding, every block, the head and the MTP depth of one micro-batch's loss."""
    cfg = load("tiny", recompute_norm=recompute, recompute_mla_up_proj=recompute)
    torch.manual_seed(0)
    model = Transformer(cfg)
    cast_for_compute(model, torch.bfloat16)
    if fp8:
        apply_fp8(model, FP8Config(recipe="emulate"))
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (1, TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(tokens, tokens.roll(-1, 1), mtp_lambda=0.3)
    attention = cpu_attention(cfg)
    # + 8: the lookup's int64 token ids, which the planner leaves to the micro-batch (its own input, held anyway)
    planned = 8 + head_activation_bytes(cfg, fp8, attention, TOKENS)[0] + sum(
        layer_activation_bytes(cfg, i >= cfg.first_k_dense, fp8, attention, TOKENS) for i in range(cfg.n_layers))
    measured = sum(saved.values()) / TOKENS
    assert abs(measured / planned - 1) < 0.10, (measured, planned)


def test_formula_refuses_unknown_kernel_and_math_without_length():
    cfg = load("tiny")
    with pytest.raises(ValueError, match="fused or math"):
        layer_activation_bytes(cfg, True, False, "flash2")
    with pytest.raises(ValueError, match="seq_len"):
        layer_activation_bytes(cfg, True, False, "math")
