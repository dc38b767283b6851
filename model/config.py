"""ModelConfig: the DeepSeek-V3 hyper-parameters (paper 2.1, 2.2, 4.2), grouped as in the paper's table; each
field's meaning is its comment here, and nowhere else.

Presets live in configs/model/*.yaml and give a value for every field (model/presets.py loads them).
`validate()` stops an inconsistent config with a message naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.config import Config, ConfigError, choice, from_dict

Balance = choice("Balance", "aux_free aux_loss batch_aux none", __name__)
ExpertGemm = choice("ExpertGemm", "grouped_mm loop", __name__)


@dataclass
class YarnConfig(Config):
    """YaRN RoPE extension (paper 4.3), in Hugging Face's `rope_scaling` semantics."""

    prefix = "model.yarn"

    factor: float = 40.0  # context extension factor s
    original_max_seq_len: int = 4096  # pre-training context the frequencies were trained for
    beta_fast: float = 32.0  # rotations above which a frequency is extrapolated (kept)
    beta_slow: float = 1.0  # rotations below which a frequency is interpolated (divided by s)
    mscale: float = 1.0  # cos/sin scale numerator: 0.1 * mscale * ln(s) + 1 (0: use 0.1 ln(s) + 1 overall)
    mscale_all_dim: float = 1.0  # softmax scale multiplier (0.1 * mscale_all_dim * ln(s) + 1)^2; 0 = off


@dataclass
class ModelConfig(Config):
    """Every architectural hyper-parameter of a DeepSeek-V3-style model."""

    prefix = "model"

    # trunk
    vocab_size: int = 129280  # tokenizer vocabulary
    dim: int = 7168  # hidden size d
    n_layers: int = 61  # Transformer blocks of the main model
    first_k_dense: int = 3  # the first k blocks use a dense FFN, the rest MoE
    inter_dim: int = 18432  # intermediate size of the dense FFNs
    norm_eps: float = 1e-6  # epsilon of the block, final and MTP norms (MLA's latent norms always use 1e-6)
    init_std: float = 0.006  # std of the normal init of every weight matrix and the embedding
    max_seq_len: int = 4096  # longest sequence the RoPE tables cover
    # mla (2.1.1)
    n_heads: int = 128  # attention heads n_h
    q_lora_rank: int | None = 1536  # query compression d'_c; None = direct query projection
    kv_lora_rank: int = 512  # KV compression d_c
    qk_nope_head_dim: int = 128  # per-head query/key dim without position d_h
    qk_rope_head_dim: int = 64  # decoupled RoPE dim d^R_h (shared key across heads)
    v_head_dim: int = 128  # per-head value dim
    rope_theta: float = 10000.0  # RoPE base
    # YaRN scaling (a YarnConfig; a mapping is converted, absent fields taking their defaults); None = plain RoPE.
    # Typed Any for Hydra: OmegaConf 2.3 cannot merge an override into a structured field that is None
    # (omry/omegaconf#1360), and `model.yarn={factor: 4}` over a preset's `yarn: null` is how YaRN is switched on.
    yarn: Any = None
    # moe (2.1.2)
    n_routed_experts: int = 256  # routed experts N_r
    n_shared_experts: int = 1  # shared experts N_s (one MLP of n_shared * moe_inter_dim)
    n_activated_experts: int = 8  # routed experts per token K_r
    n_group: int = 8  # expert groups (= nodes under node-limited routing)
    topk_group: int = 4  # groups a token may reach (M)
    moe_inter_dim: int = 2048  # intermediate size of every expert
    routed_scaling_factor: float = 2.5  # gate multiplier after normalisation
    # aux_free (bias + the small sequence-wise loss, seq_aux_alpha) | aux_loss (no bias: the classic expert-level
    # loss per sequence, aux_loss_alpha; the baseline of paper Table 5) | batch_aux (that loss over all the tokens
    # of a micro-batch, paper 4.5.3) | none
    balance: Balance = Balance("aux_free")
    seq_aux_alpha: float = 1e-4  # weight alpha of the complementary sequence-wise loss (aux_free)
    aux_loss_alpha: float = 1e-3  # weight of the classic expert-level balance loss (aux_loss, batch_aux)
    expert_gemm: ExpertGemm = ExpertGemm("grouped_mm")  # routed-expert GEMM: grouped_mm | loop (over experts)
    # route token t to experts tK .. tK + K - 1 (mod E) whatever the scores: a perfectly even load for benchmarks and
    # memory tests (the gate weights still come from the scores); every metrics record says when it is on
    force_balance: bool = False
    # mtp (2.2)
    n_mtp_depth: int = 1  # MTP depth D; 0 = no MTP modules
    # memory savers (3.2.3)
    recompute_norm: bool = False  # recompute every RMSNorm output in backward
    recompute_mla_up_proj: bool = False  # recompute the MLA up-projections (and core attention) in backward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.yarn is not None and not isinstance(self.yarn, YarnConfig):
            self.yarn = from_dict(YarnConfig, self.yarn, "model.yarn")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> ModelConfig:
        """Raise ConfigError naming the field and the constraint; return self when consistent."""
        positive = ["vocab_size", "dim", "n_layers", "inter_dim", "max_seq_len", "n_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_inter_dim", "n_routed_experts",
                    "n_activated_experts", "n_group", "topk_group"]
        for name in positive:
            if getattr(self, name) <= 0:
                _fail(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            _fail("q_lora_rank", f"must be positive or null (direct query projection), got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense <= self.n_layers:
            _fail("first_k_dense", f"must lie in [0, n_layers={self.n_layers}], got {self.first_k_dense}")
        if self.n_shared_experts < 0:
            _fail("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", f"RoPE rotates pairs of channels, so it must be even, "
                  f"got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            _fail("n_routed_experts", f"{self.n_routed_experts} is not divisible by n_group={self.n_group}; "
                  "choose n_group among the divisors of n_routed_experts")
        if self.topk_group > self.n_group:
            _fail("topk_group", f"{self.topk_group} > n_group={self.n_group}; a token cannot reach more groups "
                  "than exist")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            _fail("n_group", f"group scores sum each group's top-2 experts, so every group needs >= 2 experts "
                  f"(n_routed_experts={self.n_routed_experts} / n_group={self.n_group} = {per_group})")
        if self.n_activated_experts > self.topk_group * per_group:
            _fail("n_activated_experts", f"{self.n_activated_experts} experts per token exceed the "
                  f"{self.topk_group * per_group} held by topk_group={self.topk_group} groups of {per_group}; "
                  "raise topk_group or lower n_activated_experts")
        if self.n_mtp_depth < 0:
            _fail("n_mtp_depth", f"MTP depth D must be >= 0 (0 disables MTP), got {self.n_mtp_depth}")
        for name in ("seq_aux_alpha", "aux_loss_alpha", "init_std", "norm_eps", "routed_scaling_factor"):
            if getattr(self, name) < 0:
                _fail(name, f"must be >= 0, got {getattr(self, name)}")
        if self.yarn is not None:
            if self.yarn.factor < 1:
                _fail("yarn.factor", f"YaRN extends context, so the factor must be >= 1, got {self.yarn.factor}")
            if self.yarn.original_max_seq_len <= 0:
                _fail("yarn.original_max_seq_len", "must be positive")
            if self.yarn.beta_fast <= self.yarn.beta_slow:
                _fail("yarn.beta_fast", f"must exceed beta_slow ({self.yarn.beta_fast} <= {self.yarn.beta_slow})")
        return self


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"model.{name}: {message}")


def model_config(values: dict[str, Any]) -> ModelConfig:
    """A validated ModelConfig from a plain dict (for example a resolved Hydra node or a checkpoint's meta.json)."""
    return from_dict(ModelConfig, values, "model").validate()


__all__ = ["Balance", "ConfigError", "ExpertGemm", "ModelConfig", "YarnConfig", "model_config"]
