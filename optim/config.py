"""OptimConfig: AdamW and the paper's schedules (paper 4.2), the `optim` group of the run config
(configs/optim/*.yaml give a value for every field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import Config, ConfigError, DType


@dataclass
class OptimConfig(Config):
    """AdamW and every schedule of the paper, with token budgets as floats (1.0e13 = 10T tokens)."""

    prefix = "optim"

    # AdamW
    lr: float = 2.2e-4  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to weight matrices and embeddings, not to norms or router biases
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    moment_dtype: DType = DType("bf16")  # AdamW first/second moments: bf16 (the paper) | fp32
    # learning rate: linear warm-up (steps), constant (tokens), cosine to min_lr (tokens), constant tails
    warmup_steps: int = 2000
    constant_tokens: float = 1.0e13  # tokens from the start until the cosine decay begins
    decay_tokens: float = 4.3e12  # length of the cosine decay from lr to min_lr
    min_lr: float = 2.2e-5
    tail_lrs: list[float] = field(default_factory=lambda: [2.2e-5, 7.3e-6])  # constants after the decay
    tail_tokens: list[float] = field(default_factory=lambda: [3.33e11, 1.67e11])  # length of each constant
    # batch-size ramp: sequences per step grow linearly from batch_ramp_start to trainer.global_batch_size
    batch_ramp_start: int = 3072  # sequences per step at token 0; 0 = no ramp
    batch_ramp_tokens: float = 4.69e11  # tokens over which the batch size ramps
    # MTP loss weight lambda (paper 4.2): mtp_lambda until mtp_lambda_switch_tokens, then mtp_lambda_late
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_tokens: float = 1.0e13
    # aux-loss-free bias update speed gamma: bias_gamma until bias_gamma_stop_tokens, then 0
    bias_gamma: float = 1e-3
    bias_gamma_stop_tokens: float = 1.43e13

    def validate(self) -> OptimConfig:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2: must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if len(self.tail_lrs) != len(self.tail_tokens):
            raise ConfigError(f"optim.tail_lrs has {len(self.tail_lrs)} entries but optim.tail_tokens "
                              f"{len(self.tail_tokens)}; give one token length per tail constant")
        for name in ("warmup_steps", "constant_tokens", "decay_tokens", "batch_ramp_start", "batch_ramp_tokens",
                     "weight_decay", "grad_clip", "eps", "bias_gamma", "mtp_lambda", "mtp_lambda_late"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        if any(x < 0 for x in self.tail_lrs + self.tail_tokens):
            raise ConfigError(f"optim.tail_lrs={self.tail_lrs}, optim.tail_tokens={self.tail_tokens}: must be >= 0")
        # A bf16 moment carries 8 significant bits: when a step changes it by a factor smaller than 2^-8 the
        # rounding puts it back, so with beta2 = 0.999 the second moment would stop decaying at all.
        if self.moment_dtype == "bf16" and min(1 - self.beta1, 1 - self.beta2) <= 2**-8:
            raise ConfigError(f"optim.moment_dtype=bf16 with optim.beta1={self.beta1}, optim.beta2={self.beta2}: "
                              "bf16 moments cannot follow a decay slower than 1 - 2^-8 per step; use betas <= 0.996 "
                              "or optim.moment_dtype=fp32")
        return self
