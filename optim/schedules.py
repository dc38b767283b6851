"""The paper's schedules (paper 4.2) as pure functions of the optimizer step and of the tokens consumed so far:
learning rate, batch size (the ramp), MTP loss weight lambda, bias-update speed gamma."""

from __future__ import annotations

import math

from optim.config import OptimConfig


def lr_at(cfg: OptimConfig, step: int, tokens: float) -> float:
    """Learning rate of optimizer step `step` (0-based), taken after `tokens` training tokens.

    The paper: warm-up to 2.2e-4 over 2K steps; constant until 10T tokens; cosine decay to 2.2e-5 over 4.3T
    tokens; then 2.2e-5 for 333B and 7.3e-6 for the last 167B of the 14.8T tokens.
      1. warm-up, by steps: lr * (step + 1) / warmup_steps, so the last warm-up step already uses the peak lr;
         it takes precedence over the token phases when both apply;
      2. constant lr while tokens < constant_tokens;
      3. cosine from lr to min_lr over the next decay_tokens;
      4. tail_lrs[i] for tail_tokens[i] tokens each, in turn;
      5. the last tail value (min_lr when there are no tails) forever after.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if tokens < cfg.constant_tokens:
        return cfg.lr
    end = cfg.constant_tokens + cfg.decay_tokens
    if tokens < end:
        progress = (tokens - cfg.constant_tokens) / cfg.decay_tokens
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    for tail_lr, tail_tokens in zip(cfg.tail_lrs, cfg.tail_tokens):
        end += tail_tokens
        if tokens < end:
            return tail_lr
    return cfg.tail_lrs[-1] if cfg.tail_lrs else cfg.min_lr


def batch_size_at(cfg: OptimConfig, tokens: float, final: int, granularity: int) -> int:
    """Sequences in the optimizer step taken after `tokens` training tokens.

    The paper ramps 3072 -> 15360 sequences over the first 469B tokens, then holds 15360. The ramp is linear in
    tokens and rounded down to a multiple of `granularity` (micro_batch_size x data-parallel size: a step grows by
    whole micro-batches), within [granularity, final]. batch_ramp_start = 0 or batch_ramp_tokens = 0: always
    `final` (trainer.global_batch_size).
    """
    if granularity < 1 or final % granularity:
        raise ValueError(f"trainer.global_batch_size={final} must be a positive multiple of micro_batch_size x "
                         f"data-parallel size = {granularity}")
    if cfg.batch_ramp_start == 0 or cfg.batch_ramp_tokens == 0:
        return final
    if cfg.batch_ramp_start > final:
        raise ValueError(f"optim.batch_ramp_start={cfg.batch_ramp_start} exceeds trainer.global_batch_size={final}; "
                         "lower it, or set optim.batch_ramp_start=0 for a constant batch size")
    if tokens >= cfg.batch_ramp_tokens:
        return final
    size = cfg.batch_ramp_start + (final - cfg.batch_ramp_start) * tokens / cfg.batch_ramp_tokens
    return min(final, max(granularity, int(size) // granularity * granularity))


def mtp_lambda_at(cfg: OptimConfig, tokens: float) -> float:
    """MTP loss weight: 0.3 for the first 10T tokens, then 0.1 (paper 4.2)."""
    return cfg.mtp_lambda if tokens < cfg.mtp_lambda_switch_tokens else cfg.mtp_lambda_late


def bias_gamma_at(cfg: OptimConfig, tokens: float) -> float:
    """Bias update speed of aux-loss-free balancing: 0.001 for the first 14.3T tokens, then 0 (paper 4.2)."""
    return cfg.bias_gamma if tokens < cfg.bias_gamma_stop_tokens else 0.0
