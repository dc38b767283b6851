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
exactly pass e of every dataset). The epoch's N samples are shuffled into the global order G by a keyed bijection
of [0, N), computed per position (EpochOrder): nothing proportional to N is ever held, so that N = 3.6e9 samples
(DeepSeek-V3's 14.8T tokens at 4K) costs a rank a few hundred bytes instead of a 29 GB permutation. Data-parallel
rank r reads G[r], G[r + dp_size], G[r + 2 dp_size], ... across epoch boundaries, so the ranks together read every
sample of an epoch once, and a step's micro-batches on all ranks together are the single-process batch of dp_size
times their size. The sampler state is one number: samples read by this rank; each epoch is reshuffled.

The bijection (keyed_permutation): an 8-round Feistel network over the 2^b >= max(N, 64) integers of b bits,
split into halves of floor(b/2) and ceil(b/2) bits, whose round function is splitmix64's finaliser of the half
plus a round key (hashed from seed, epoch and round), restricted to [0, N) by cycle walking (re-encrypt until the
value falls below N: a bijection of [0, N), fewer than 2 steps on average since 2^b < 2N for N > 64). A Feistel
network with a pseudorandom round function is a pseudorandom permutation (Luby-Rackoff: 4 rounds suffice for
large halves; 8 and the 64-value floor keep small N well mixed too): over seeds, the position of a sample and
the pair at the first two positions are uniform by chi-square down to N = 3 (tests/unit/test_data_scale.py). It
draws from a subset of the N! orders, not all of them, which no 64-bit-seeded shuffle can do either. A position
costs about 10 us one at a time, under 0.5 us vectorised over a batch, as next_batch draws them
(bench/data_scale.py).

Verification: every rank checks each token file's header, sizes and offsets (TokenFile, cheap). The checksum
that hai-data recorded while writing is compared to a full hash of the file only where data.verify asks: "off"
(the default: one core hashes at most about 1 GB/s, some 16 hours for DeepSeek-V3's 59 TB of token ids),
"rank0" (global rank 0, for files on shared storage), "node" (local rank 0 of each node, for node-local copies)
or "all". The hashing ranks work block by block and, after each block, all ranks agree over the process group
(one small all-reduce, well within parallel.timeout_s), so that a failure on any rank, a missing or truncated
file included, stops every rank with the same DataError naming the file and the fix. Without a process group
(one process, or build_data called before init_process_group) a rank raises alone, and the others stop when the
launcher ends the job.

Validation: ceil(valid_fraction * documents) documents of each dataset (at least one when valid_fraction > 0,
never all), chosen by an rng keyed by the file's checksum (so the same for every seed and run), are never used
for training; they are packed in index order without FIM, and rank r reads every dp_size-th validation sample.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import DataError
from data.boundaries import combined_tokens, split_combined
from data.config import DataConfig, Verify
from data.corpus import prepare_default_corpus
from data.megatron import MegatronTokenFile, is_megatron
from data.preprocess import REWRITE_HINT, TokenFile
from data.tokenizer import Tokenizer

STATE_VERSION = 2  # 2: the Feistel epoch order (1 held a full numpy permutation per epoch)
_SPLIT, _SHUFFLE, _FIM, _EPOCH, _BOUNDARY = 1, 2, 3, 4, 5  # rng stream tags
ROUNDS, MIN_BITS = 8, 6  # Feistel rounds; smallest domain 2^MIN_BITS (module docstring)
VERIFY_BLOCK = 1 << 26  # bytes hashed between two agreements of the ranks: well under a second
_MASK64, _GOLDEN = (1 << 64) - 1, 0x9E3779B97F4A7C15


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % (1 << 64) for k in key])


# ---- the epoch order ------------------------------------------------------------------------------------------
def _mix64(x):
    """splitmix64's finaliser, a bijection of 64-bit words with full avalanche, on an int or a uint64 array."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash64(*parts: int) -> int:
    """A 64-bit hash of a sequence of integers (any sign), order-sensitive."""
    h = _GOLDEN
    for p in parts:
        h = _mix64(((h ^ (int(p) & _MASK64)) + _GOLDEN) & _MASK64)
    return h


@functools.lru_cache(maxsize=16)
def round_keys(seed: int, epoch: int) -> tuple[int, ...]:
    """The Feistel round keys of one epoch's order."""
    return tuple(hash64(seed, _EPOCH, epoch, r) for r in range(ROUNDS))


def _feistel(x, high: int, low: int, keys: tuple[int, ...]):
    """One pass of the Feistel network over high + low bits (halves of alternating widths), int or uint64 array."""
    left, right = x >> low, x & ((1 << low) - 1)
    for key in keys:
        left, right = right, (left ^ _mix64((right + key) & _MASK64)) & ((1 << high) - 1)
        high, low = low, high
    return (left << low) | right


def keyed_permutation(x, n: int, keys: tuple[int, ...]):
    """pi(x) for a bijection pi of [0, n) chosen by `keys`: x an int (returns an int) or an integer array (returns
    an int64 array of the same shape); O(1) memory besides the array."""
    bits = max(MIN_BITS, (int(n) - 1).bit_length())
    high, low = bits // 2, bits - bits // 2
    if not isinstance(x, np.ndarray):
        x = int(x)
        while True:  # cycle walking: the cycle through x < n returns below n
            x = _feistel(x, high, low, keys)
            if x < n:
                return x
    y = _feistel(x.astype(np.uint64), high, low, keys)
    walk = np.flatnonzero(y >= n)
    while walk.size:
        y[walk] = _feistel(y[walk], high, low, keys)
        walk = walk[y[walk] >= n]
    return y.astype(np.int64)


class EpochOrder:
    """The shuffled order G of epochs of n samples: global position g (of epoch g // n) holds sample
    `self[g]` of its epoch, a keyed bijection per epoch (module docstring); state: n and the seed."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"an epoch needs at least one sample, got n = {n}")
        self.n, self.seed = int(n), int(seed)

    def __getitem__(self, g: int) -> int:
        epoch, k = divmod(int(g), self.n)
        return keyed_permutation(k, self.n, round_keys(self.seed, epoch))

    def take(self, g: np.ndarray) -> np.ndarray:
        """`self[g]` for every global position of the integer array g, vectorised (int64, g's shape)."""
        g = np.asarray(g, dtype=np.int64)
        epochs, k = np.divmod(g, self.n)
        if g.size and epochs.min() == epochs.max():
            return keyed_permutation(k, self.n, round_keys(self.seed, int(epochs.flat[0])))
        out = np.empty_like(g)
        for epoch in np.unique(epochs).tolist():  # a batch spans one epoch, two at a boundary
            here = epochs == epoch
            out[here] = keyed_permutation(k[here], self.n, round_keys(self.seed, epoch))
        return out


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
        self.order = EpochOrder(self.samples_per_epoch, seed)
        self._valid = [s.valid_pass() for s in self.sources]
        self._valid_starts = np.cumsum([0] + [v.n_samples for v in self._valid])  # [datasets + 1]
        # merged punctuation + line-break tokens and their parts (paper 4.1), split in training samples only
        self._combined = combined_tokens(tokenizer) if cfg.split_combined_rate > 0 else {}

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
        return self._epoch_sample(g // self.samples_per_epoch, self.order[g])

    def _epoch_sample(self, epoch: int, k: int) -> np.ndarray:
        """Sample k of epoch `epoch` before the shuffle: dataset d's samples fill [starts[d], starts[d + 1])."""
        d = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.sources[d].sample(epoch * self.counts[d] + k - int(self.starts[d]))

    def next_batch(self, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), two LongTensors [micro_batch_size, seq_len]; labels are tokens shifted by one."""
        g = (self.position + np.arange(micro_batch_size, dtype=np.int64)) * self.dp_size + self.dp_rank
        rows = [self._epoch_sample(e, k) for e, k in zip((g // self.samples_per_epoch).tolist(),
                                                         self.order.take(g).tolist())]
        if self._combined:  # keyed by the global index: the same tokens on any layout and after a resume
            rows = [split_combined(r, self._combined, self.cfg.split_combined_rate, _rng(_BOUNDARY, self.seed, i))
                    for r, i in zip(rows, g.tolist())]
        self.position += micro_batch_size
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
        if state["version"] != STATE_VERSION:
            raise DataError(f"data state: version {state['version']!r} differs from this code's {STATE_VERSION} (the "
                            "sample order changed with it, so the run cannot be continued exactly); resume with the "
                            "code that saved the checkpoint, or start a new run (another trainer.run_dir)")
        for key, mine in (("seed", self.seed), ("data", self._data_id())):
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


class Ranks:
    """This process among the ranks that build the data, as the start-up check needs it: its global and local
    rank (LOCAL_RANK, else SLURM_LOCALID, else the global rank) and `agree`, over torch.distributed's default
    group (host tensors: gloo, alone or beside NCCL)."""

    def __init__(self):
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else int(os.environ.get("RANK", "0"))
        self.world = dist.get_world_size() if self.distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", self.rank)))

    def hashes(self, verify: Verify) -> bool:
        """Whether this rank hashes the token files under data.verify = `verify`."""
        return {Verify.off: False, Verify.rank0: self.rank == 0, Verify.node: self.local_rank == 0,
                Verify.all: True}[Verify(verify)]

    def agree(self, pending: bool, error: str | None) -> tuple[bool, str | None]:
        """(whether any rank is still hashing, the error of the lowest rank that has one); a collective."""
        if not self.distributed:
            return pending, error
        flags = torch.tensor([int(pending), self.world - self.rank if error else 0], dtype=torch.int64, device="cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        busy, failed = flags.tolist()
        if not failed:
            return bool(busy), None
        src, box = self.world - failed, [error]
        dist.broadcast_object_list(box, src=src)
        return bool(busy), box[0] if src == self.rank else f"{box[0]} (found by rank {src}; every rank stops)"


def build_data(cfg: DataConfig, seed: int, dp_rank: int = 0, dp_size: int = 1,
               ranks: Ranks | None = None) -> DataPipeline:
    """The pipeline of `cfg` (validated: RunConfig.validate) for one rank: cfg.datasets with cfg.tokenizer, or the
    default corpus (prepared once). Collective over the default process group when there is one: every rank calls
    it; a data error on any rank (or a checksum mismatch where data.verify hashes) raises on all of them."""
    ranks = ranks or Ranks()
    opened, error = None, None
    try:
        opened = _open(cfg)
    except DataError as err:
        error = str(err)
    check_together(opened[1] if opened is not None and ranks.hashes(cfg.verify) else [], ranks, error)
    tokenizer, files = opened
    return DataPipeline(cfg, tokenizer, files, seed, dp_rank, dp_size)


def check_together(files: list[TokenFile], ranks: Ranks, error: str | None = None) -> None:
    """Hash `files` block by block (none: only agree), agreeing with the other ranks after each block; a DataError
    on every rank as soon as any rank has one (`error`: one this rank found before)."""
    blocks = chain.from_iterable(tf.verify_blocks(VERIFY_BLOCK) for tf in files)
    while True:
        pending = False
        if error is None:
            try:
                pending = next(blocks, None) is not None
            except DataError as err:
                error = str(err)
        busy, error = ranks.agree(pending, error)
        if error is not None:
            raise DataError(error)
        if not busy:
            return


def _open(cfg: DataConfig) -> tuple[Tokenizer, list[TokenFile]]:
    """The tokenizer and token files of `cfg`, each file's header, sizes and offsets checked (no hashing)."""
    if cfg.datasets:
        if cfg.tokenizer is None:
            raise DataError("data.datasets is set but data.tokenizer is not; give the tokenizer.json the token "
                            "files were made with (hai-data --tokenizer)")
        tokenizer_path, prefixes, fix = Path(cfg.tokenizer), cfg.datasets, REWRITE_HINT
    else:
        tokenizer_path, prefixes = prepare_default_corpus(cfg)
        fix = f"delete {tokenizer_path.parent} and the next run prepares the default corpus again"
    tokenizer = Tokenizer.load(tokenizer_path)
    files = [MegatronTokenFile(p, tokenizer.vocab_size) if is_megatron(p) else TokenFile(p, verify=False, fix=fix)
             for p in prefixes]
    for i, tf in enumerate(files):
        if tf.fingerprint is not None and tf.fingerprint != tokenizer.fingerprint:  # None: Megatron's records none
            raise DataError(f"data.datasets[{i}] = {tf.prefix} was encoded with another tokenizer (vocab "
                            f"{tf.vocab_size}) than {tokenizer_path} (vocab {tokenizer.vocab_size}); re-run hai-data "
                            f"with --tokenizer {tokenizer_path}, or set data.tokenizer to the one it was made with")
    return tokenizer, files
