"""The DeepSeek-V3 network (paper 2.1): embedding, blocks, final norm, output head and MTP modules.

Layers live in a ModuleDict keyed by their global index, so parameter names are the same whichever
pipeline stage holds them. The model knows nothing about ranks: `embed`, `norm`, `head` and `mtp` may be
None on a pipeline stage that does not own them.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from model.block import Block, run_steps
from model.config import ModelConfig
from model.init import init_parameters
from model.linear import Linear
from model.loss import IGNORE_INDEX, linear_cross_entropy
from model.mtp import MTPModule
from model.norm import RMSNorm
from model.rope import rope_tables


@dataclass
class LossOutput:
    loss: torch.Tensor  # main + (lambda / D) * sum_k mtp_k; what backward is called on
    main: torch.Tensor  # next-token cross-entropy (detached)
    mtp: list[torch.Tensor]  # cross-entropy per MTP depth (detached)


class Transformer(nn.Module):
    """The model of a validated ModelConfig (presets.load, model_config, RunConfig.validate or its `validate()`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # no constructor init (reset_parameters draws every tensor): a meta build would pay torch's slow meta normal_
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim,
                                                       _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleDict({str(i): Block(i, cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps, cfg.recompute_norm)
        self.head: Linear | None = Linear(cfg.dim, cfg.vocab_size)
        self.mtp: nn.ModuleList | None = nn.ModuleList(
            MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp_depth))
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not cos.is_meta:  # built under torch.device("meta"): `model.init.materialize` initialises it later
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every weight matrix and the embedding, each from a generator keyed by its name
        and `seed` (default: the seed torch's global generator was last seeded with); norms 1; router bias 0
        (model/init.py)."""
        init_parameters(self, torch.initial_seed() if seed is None else seed, self.cfg.init_std)

    @staticmethod
    def gate_names(cfg: ModelConfig) -> list[str]:
        """The module paths of every router of the model of `cfg` (main MoE layers, then MTP blocks), whichever
        parts a pipeline stage holds."""
        main = [f"layers.{i}.ffn.gate" for i in range(cfg.first_k_dense, cfg.n_layers)]
        return main + [f"mtp.{k}.block.ffn.gate" for k in range(cfg.n_mtp_depth)]  # MTP blocks are MoE blocks

    def drop_mtp(self) -> None:
        """Remove the MTP modules (inference does not need them, paper 2.2)."""
        self.mtp = None

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE cos/sin tables [seq_len, rope_dim/2] of the first `seq_len` positions."""
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def hidden(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, dim] before the last norm."""
        return run_steps(self.layer_steps(self.embed(tokens), None, document_ids))

    def layer_steps(self, h: torch.Tensor, layer_ids: Iterable[int] | None = None,
                    document_ids: torch.Tensor | None = None) -> Generator[None, None, torch.Tensor]:
        """Hidden states [B, T, dim] through blocks `layer_ids` in order (None: every block this model holds, all
        of them or a pipeline stage's), as a generator that pauses after each all-to-all a block launches
        (`Block.steps`; `run_steps` runs it without pausing)."""
        cos, sin = self.rope(h.shape[1])
        mask = document_mask(document_ids)
        layers = self.layers.values() if layer_ids is None else (self.layers[str(i)] for i in layer_ids)
        for layer in layers:
            h = yield from layer.steps(h, cos, sin, mask)
        return h

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. MTP modules are not run."""
        return self.head(self.norm(self.hidden(tokens, document_ids)))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_lambda: float = 0.0,
             document_ids: torch.Tensor | None = None) -> LossOutput:
        """Training objective (paper 2.2): CE(next token) + (lambda / D) * sum_k CE_k.

        labels [B, T] are the next tokens (labels[:, i] = t_{i+1}; IGNORE_INDEX masks a position). Depth k
        embeds t_{i+k} = labels[:, i+k-1] and predicts t_{i+k+1} = labels[:, i+k]; the last k positions,
        which have no such tokens, are masked (equivalent to the paper's shorter sequences, since attention
        is causal).
        """
        return self.output_loss(self.hidden(tokens, document_ids), labels, mtp_lambda, document_ids)

    def output_loss(self, h: torch.Tensor, labels: torch.Tensor, mtp_lambda: float = 0.0,
                    document_ids: torch.Tensor | None = None) -> LossOutput:
        """`loss` from the last block's hidden states [B, T, dim] on: final norm, head, MTP (a last stage's part)."""
        main = linear_cross_entropy(self.norm(h), self.head, labels)
        total, mtp_losses = main, []
        if self.mtp is not None and len(self.mtp) and mtp_lambda:
            cos, sin = self.rope(h.shape[1])
            mask = document_mask(document_ids)
            depth = len(self.mtp)
            for k, module in enumerate(self.mtp, start=1):
                emb_tokens = shift_left(labels, k - 1, IGNORE_INDEX)
                target = shift_left(labels, k, IGNORE_INDEX)
                target = target.masked_fill(emb_tokens == IGNORE_INDEX, IGNORE_INDEX)
                h = module(h, self.embed(emb_tokens.clamp_min(0)), cos, sin, mask)
                ce = linear_cross_entropy(module.norm(h), self.head, target)
                mtp_losses.append(ce.detach())
                total = total + (mtp_lambda / depth) * ce
        return LossOutput(total, main.detach(), mtp_losses)


def position_losses(model: Transformer, h: torch.Tensor, labels: torch.Tensor, buckets: int) -> torch.Tensor:
    """The next-token loss of each of `buckets` consecutive position ranges of the sequence (the first 1/buckets of
    positions, then the next, ...; `torch.tensor_split` sizes), [buckets] float64: the view of a long-context
    extension (paper 4.3), where the positions beyond the trained length are the ones that change."""
    normed = model.norm(h)
    return torch.stack([linear_cross_entropy(n, model.head, y).double()
                        for n, y in zip(normed.tensor_split(buckets, dim=1), labels.tensor_split(buckets, dim=1))])


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i + k] at position i; the last k positions get `fill`."""
    if k == 0:
        return x
    return torch.cat([x[:, k:], x.new_full((x.shape[0], k), fill)], dim=1)


def document_mask(document_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Causal mask that also hides other documents: [B, T] ids -> bool [B, 1, T, T] (True = attend)."""
    if document_ids is None:
        return None
    t = document_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & causal).unsqueeze(1)
