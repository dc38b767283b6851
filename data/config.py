"""DataConfig: what the model reads (paper 4.1-4.2: packed documents, FIM in PSM form at rate 0.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import Config, ConfigError, choice

Verify = choice("Verify", "off rank0 node all", __name__)
"""Which ranks hash the token files at start-up (`data.verify`)."""


@dataclass
class DataConfig(Config):
    """Token sources, packing and the tokenizer: the `data` group of the run config (configs/data/*.yaml)."""

    prefix = "data"

    seq_len: int = 256  # tokens per packed training sequence (the model sees seq_len, predicts the next)
    # token-file prefixes: hai-data's or Megatron-LM's indexed datasets (.bin + .idx); [] = the default corpus
    datasets: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # blend weight per dataset; [] = proportional to size
    tokenizer: str | None = None  # tokenizer.json path; None = the default corpus's tokenizer (trained, cached)
    vocab_size: int = 8192  # vocabulary of a tokenizer trained here; must equal model.vocab_size
    fim_rate: float = 0.1  # fraction of documents rewritten as prefix-suffix-middle (paper 4.1)
    # share of the tokens that merge punctuation with line breaks split into their parts in training samples (paper
    # 4.1's token-boundary fix, data/boundaries.py); only tokenizers whose pretokenizer makes such tokens have any
    split_combined_rate: float = 0.0
    valid_fraction: float = 0.01  # documents held out for validation (taken from each dataset)
    cache_dir: str = "~/.cache/hai-llm"  # where the default corpus, its tokenizer and token files are cached
    corpus_bytes: int = 16_000_000  # how much default-corpus text to prepare (standard library + python3-doc)
    preprocess_workers: int = 2  # worker processes of hai-data
    verify: Verify = Verify("off")  # token-file hash check at start: off | rank0 | node | all (data/dataset.py)

    def validate(self) -> DataConfig:
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len: must be positive, got {self.seq_len}")
        if self.weights and len(self.weights) != len(self.datasets):
            raise ConfigError(f"data.weights: {len(self.weights)} weights for {len(self.datasets)} data.datasets; "
                              "give one weight per dataset or none")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"data.weights: must be >= 0 with a positive sum, got {self.weights}")
        if not 0 <= self.fim_rate <= 1:
            raise ConfigError(f"data.fim_rate: must lie in [0, 1], got {self.fim_rate}")
        if not 0 <= self.split_combined_rate <= 1:
            raise ConfigError(f"data.split_combined_rate: must lie in [0, 1], got {self.split_combined_rate}")
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError(f"data.valid_fraction: must lie in [0, 1), got {self.valid_fraction}")
        if self.vocab_size < 512:
            raise ConfigError(f"data.vocab_size: a byte-level BPE needs at least 512 entries, got {self.vocab_size}")
        if self.corpus_bytes <= 0:
            raise ConfigError(f"data.corpus_bytes: must be positive, got {self.corpus_bytes}")
        if self.preprocess_workers < 1:
            raise ConfigError(f"data.preprocess_workers: must be >= 1, got {self.preprocess_workers}")
        return self
