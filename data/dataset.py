"""The training data pipeline: packing, FIM, blending, a held-out split and a resumable sharded sampler (paper 4.2).

How a training sample is made, for a dataset d (a hai-data token file) and a pass p over its training documents:
  1. the documents are shuffled with an rng keyed by (seed, d, p);
  2. each document is rewritten as Prefix-Suffix-Middle with probability fim_rate (paper 4.1):
         <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle
     with the two split points drawn uniformly over token positions (FIM at the token level) by an rng keyed by
     (seed, d, p, document);
  3. every document gets <|eos|> appended (at pack time: token files hold bare documents);
  4. the stream is cut into samples of seq_len + 1 tokens (inputs = sample[:-1], labels = sample[1:]). Documents run
     across sample boundaries and attend to each other inside a sample: no cross-document mask (paper 4.2).
A pass holds exactly n_d = (tokens + documents) // (seq_len + 1) samples; the FIM tokens push a few tail tokens out
of each pass, a different random tail each time. Dataset d is the endless sequence of its passes.

Blending and epochs: an epoch holds N = sum_d n_d samples, of which dataset d gives c_d, taken in order from its
sequence (with data.weights: c_d = N * w_d / sum(w), largest-remainder rounding; without: c_d = n_d, so epoch e is
exactly pass e of every dataset). The epoch's N samples are shuffled by an rng keyed by (seed, epoch) into the
global order G; data-parallel rank r reads G[r], G[r + dp_size], G[r + 2 dp_size], ... across epoch boundaries, so
the ranks together read every sample of an epoch once, and a step's micro-batches on all ranks together are the
single-process batch of dp_size times their size. The sampler state is one number: samples read by this rank.

Validation: ceil(valid_fraction * documents) documents of each dataset (at least one when valid_fraction > 0,
never all), chosen by an rng keyed by the file's checksum (so the same for every seed and run), are never used
for training; they are packed in index order without FIM, and rank r reads every dp_size-th validation sample.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from data import DataError
from data.config import DataConfig
from data.corpus import prepare_default_corpus
from data.preprocess import REWRITE_HINT, TokenFile
from data.tokenizer import Tokenizer

STATE_VERSION = 1
_SPLIT, _SHUFFLE, _FIM, _EPOCH = 1, 2, 3, 4  # rng stream tags


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % (1 << 64) for k in key])


def check_vocab(data_vocab_size: int, model_vocab_size: int) -> None:
    """The model's embedding must hold every token id the tokenizer can produce."""
    if data_vocab_size > model_vocab_size:
        raise DataError(f"the tokenizer (data.tokenizer, or the default corpus's, data.vocab_size) has "
                        f"{data_vocab_size} tokens but model.vocab_size is {model_vocab_size}; set model.vocab_size "
                        f">= {data_vocab_size}, or data.vocab_size = {model_vocab_size} to train a tokenizer that fits")


class SpecialIds:
    def __init__(self, tokenizer: Tokenizer):
        ids = (tokenizer.eos_id, tokenizer.fim_begin_id, tokenizer.fim_hole_id, tokenizer.fim_end_id)
        self.eos, self.fim_begin, self.fim_hole, self.fim_end = (np.array([i], dtype=np.int64) for i in ids)


def fim_psm(doc: np.ndarray, a: int, b: int, ids: SpecialIds) -> list[np.ndarray]:
    """A document split at token positions a <= b, in PSM order (paper 4.1), as views into `doc`."""
    return [ids.fim_begin, doc[:a], ids.fim_hole, doc[b:], ids.fim_end, doc[a:b]]


class PackedPass:
    """Documents of one token file in a given order, optionally FIM-rewritten, each followed by <|eos|>, cut into
    `n_samples` samples of `sample_len` tokens; a sample is assembled on demand from memory-mapped documents."""

    def __init__(self, tf: TokenFile, lengths: np.ndarray, order: np.ndarray, fim: np.ndarray, sample_len: int,
                 ids: SpecialIds, fim_key: tuple[int, ...] = ()):
        self.tf, self.order, self.fim, self.sample_len = tf, order, fim, sample_len
        self.ids, self.fim_key = ids, fim_key
        self.lengths = lengths[order] + 1 + 3 * fim  # [docs] tokens with eos and FIM markers
        self.ends = np.cumsum(self.lengths)
        self.n_samples = int(lengths[order].sum() + len(order)) // sample_len

    def document(self, q: int) -> list[np.ndarray]:
        """The q-th document of the pass as a list of segments: the document or its PSM form, then <|eos|>."""
        doc = self.tf.doc(int(self.order[q]))
        if not self.fim[q]:
            return [doc, self.ids.eos]
        a, b = np.sort(_rng(*self.fim_key, self.order[q]).integers(0, len(doc) + 1, size=2))
        return fim_psm(doc, int(a), int(b), self.ids) + [self.ids.eos]

    def sample(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_samples:
            raise IndexError(f"sample {i} of a pass with {self.n_samples}")
        start, out, filled = i * self.sample_len, np.empty(self.sample_len, dtype=np.int64), 0
        q = int(np.searchsorted(self.ends, start, side="right"))
        skip = start - int(self.ends[q] - self.lengths[q])  # tokens of document q that precede this sample
        while filled < self.sample_len:
            for segment in self.document(q):
                piece = segment[skip:skip + self.sample_len - filled]
                skip = max(0, skip - len(segment))
                out[filled:filled + len(piece)] = piece
                filled += len(piece)
            q += 1
        return out


class Source:
    """One dataset: its token file, train/validation documents, and its endless sequence of shuffled passes."""

    def __init__(self, tf: TokenFile, index: int, cfg: DataConfig, seed: int, ids: SpecialIds):
        self.tf, self.index, self.cfg, self.seed, self.ids = tf, index, cfg, seed, ids
        self.sample_len = cfg.seq_len + 1
        self.lengths = tf.doc_lengths
        self.valid_ids, self.train_ids = split_documents(tf, cfg.valid_fraction)
        self.n_samples = int(self.lengths[self.train_ids].sum() + len(self.train_ids)) // self.sample_len
        if self.n_samples == 0:
            raise DataError(f"{tf.prefix}: {int(self.lengths[self.train_ids].sum())} training tokens do not fill "
                            f"one sample of data.seq_len + 1 = {self.sample_len}; lower data.seq_len or add text")
        self._passes: dict[int, PackedPass] = {}

    def packed_pass(self, p: int) -> PackedPass:
        if p not in self._passes:
            rng = _rng(self.seed, _SHUFFLE, self.index, p)
            order = rng.permutation(self.train_ids)
            fim = rng.random(len(order)) < self.cfg.fim_rate
            if len(self._passes) >= 4:
                self._passes.pop(next(iter(self._passes)))
            self._passes[p] = PackedPass(self.tf, self.lengths, order, fim, self.sample_len, self.ids,
                                         fim_key=(self.seed, _FIM, self.index, p))
        return self._passes[p]

    def sample(self, j: int) -> np.ndarray:
        """Sample j of the dataset's sequence of passes."""
        p, i = divmod(j, self.n_samples)
        return self.packed_pass(p).sample(i)

    def valid_pass(self) -> PackedPass:
        no_fim = np.zeros(len(self.valid_ids), dtype=bool)
        return PackedPass(self.tf, self.lengths, self.valid_ids, no_fim, self.sample_len, self.ids)


def split_documents(tf: TokenFile, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(validation, training) document ids, each sorted; the choice depends only on the file's contents."""
    n_valid = min(math.ceil(valid_fraction * tf.n_docs), tf.n_docs - 1) if valid_fraction > 0 else 0
    chosen = np.zeros(tf.n_docs, dtype=bool)
    chosen[_rng(_SPLIT, int.from_bytes(tf.checksum[:8], "little")).permutation(tf.n_docs)[:n_valid]] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def blend_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Samples per epoch of each dataset: its size without weights, else N * w / sum(w), largest remainder."""
    if not weights:
        return list(sizes)
    total = sum(sizes)
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda d: (counts[d] - exact[d], d))
    for d in by_remainder[:total - sum(counts)]:
        counts[d] += 1
    return counts


class DataPipeline:
    """Batches for one data-parallel rank: blended, packed, FIM-rewritten samples in a resumable order."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, token_files: list[TokenFile], seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0..dp_size-1 = 0..{dp_size - 1}")
        self.cfg, self.tokenizer, self.seed, self.dp_rank, self.dp_size = cfg, tokenizer, seed, dp_rank, dp_size
        ids = SpecialIds(tokenizer)
        self.sources = [Source(tf, d, cfg, seed, ids) for d, tf in enumerate(token_files)]
        self.counts = blend_counts([s.n_samples for s in self.sources], cfg.weights)  # per epoch, per dataset
        self.starts = np.cumsum([0] + self.counts)  # [datasets + 1] where each dataset's samples begin in an epoch
        self.samples_per_epoch = int(self.starts[-1])
        self.position = 0  # samples this rank has read
        self._epoch_order: tuple[int, np.ndarray] | None = None
        self._valid = [s.valid_pass() for s in self.sources]
        self._valid_starts = np.cumsum([0] + [v.n_samples for v in self._valid])  # [datasets + 1]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def epoch(self) -> int:
        return self._global_index() // self.samples_per_epoch

    def _global_index(self) -> int:
        return self.position * self.dp_size + self.dp_rank

    def sample(self, g: int) -> np.ndarray:
        """Sample g of the global order G (module docstring): seq_len + 1 token ids."""
        epoch, k = divmod(g, self.samples_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, _rng(self.seed, _EPOCH, epoch).permutation(self.samples_per_epoch))
        k = int(self._epoch_order[1][k])
        d = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.sources[d].sample(epoch * self.counts[d] + k - int(self.starts[d]))

    def next_batch(self, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), two LongTensors [micro_batch_size, seq_len]; labels are tokens shifted by one."""
        rows = []
        for _ in range(micro_batch_size):
            rows.append(self.sample(self._global_index()))
            self.position += 1
        return _split(np.stack(rows))

    def valid_batches(self, n_batches: int, micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n_batches held-out batches of this rank, the same on every call (cycled when too few)."""
        if self._valid_starts[-1] == 0:
            raise DataError(f"no validation sample: the held-out documents (data.valid_fraction = "
                            f"{self.cfg.valid_fraction}) hold fewer than data.seq_len + 1 = {self.cfg.seq_len + 1} "
                            "tokens; raise data.valid_fraction or lower data.seq_len")
        batches = []
        for b in range(n_batches):
            rows = [(b * micro_batch_size + i) * self.dp_size + self.dp_rank for i in range(micro_batch_size)]
            batches.append(_split(np.stack([self._valid_sample(v) for v in rows])))
        return batches

    def _valid_sample(self, v: int) -> np.ndarray:
        v %= int(self._valid_starts[-1])
        d = int(np.searchsorted(self._valid_starts, v, side="right")) - 1
        return self._valid[d].sample(v - int(self._valid_starts[d]))

    # ---- resuming -----------------------------------------------------------------------------------------------
    def _data_id(self) -> str:
        """What the sample order depends on besides the seed: files, blend, seq_len, FIM rate, split."""
        facts = [s.tf.checksum.hex() for s in self.sources] + [self.counts, self.cfg.seq_len, self.cfg.fim_rate,
                                                               self.cfg.valid_fraction]
        return hashlib.blake2b(repr(facts).encode(), digest_size=8).hexdigest()

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "position": self.position, "epoch": self.epoch, "seed": self.seed,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "samples_per_epoch": self.samples_per_epoch,
                "data": self._data_id()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved pipeline was; a different dp_size is allowed when the samples read divide."""
        missing = {"version", "seed", "data", "position", "dp_size"} - state.keys()
        if missing:
            raise DataError(f"data state: missing {sorted(missing)}; pass what DataPipeline.state_dict() returned")
        for key, mine in (("version", STATE_VERSION), ("seed", self.seed), ("data", self._data_id())):
            if state.get(key) != mine:
                raise DataError(f"data state: {key} {state.get(key)!r} differs from this pipeline's {mine!r}; resume "
                                "with the seed and data config (data.datasets, weights, seq_len, fim_rate, "
                                "valid_fraction, tokenizer) the state was saved with")
        consumed = state["position"] * state["dp_size"]  # samples read by all ranks together
        if consumed % self.dp_size:
            raise DataError(f"data state: {consumed} samples read by {state['dp_size']} ranks cannot be split over "
                            f"dp_size {self.dp_size}; resume with a dp_size that divides {consumed}")
        self.position = consumed // self.dp_size

    def __repr__(self) -> str:
        files = ", ".join(f"{s.tf.prefix.name} ({len(s.train_ids)}+{len(s.valid_ids)} docs, {c} samples/epoch)"
                          for s, c in zip(self.sources, self.counts))
        return (f"DataPipeline({files}; seq_len {self.cfg.seq_len}, vocab {self.vocab_size}, "
                f"{self._valid_starts[-1]} validation samples, rank {self.dp_rank}/{self.dp_size}, epoch {self.epoch})")


def _split(samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(samples)  # [B, seq_len + 1] int64
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def build_data(cfg: DataConfig, seed: int, dp_rank: int = 0, dp_size: int = 1) -> DataPipeline:
    """The pipeline of `cfg` (validated: RunConfig.validate) for one rank: cfg.datasets with cfg.tokenizer, or the
    default corpus (prepared once)."""
    if cfg.datasets:
        if cfg.tokenizer is None:
            raise DataError("data.datasets is set but data.tokenizer is not; give the tokenizer.json the token "
                            "files were made with (hai-data --tokenizer)")
        tokenizer_path, prefixes, fix = Path(cfg.tokenizer), cfg.datasets, REWRITE_HINT
    else:
        tokenizer_path, prefixes = prepare_default_corpus(cfg)
        fix = f"delete {tokenizer_path.parent} and the next run prepares the default corpus again"
    tokenizer = Tokenizer.load(tokenizer_path)
    files = [TokenFile(p, fix=fix) for p in prefixes]
    for i, tf in enumerate(files):
        if tf.fingerprint != tokenizer.fingerprint:
            raise DataError(f"data.datasets[{i}] = {tf.prefix} was encoded with another tokenizer (vocab "
                            f"{tf.vocab_size}) than {tokenizer_path} (vocab {tokenizer.vocab_size}); re-run hai-data "
                            f"with --tokenizer {tokenizer_path}, or set data.tokenizer to the one it was made with")
    return DataPipeline(cfg, tokenizer, files, seed, dp_rank, dp_size)
