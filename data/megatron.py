"""Megatron-LM's indexed dataset (PREFIX.bin + PREFIX.idx, "MMIDIDX"), read as it is, so that data a user already
tokenised for Megatron trains here without re-encoding (`data.datasets` takes its prefix next to hai-data's token
files; `open_token_file` tells them apart by the index's magic, and blending by weight mixes both).

The index, as Megatron's documentation and its `_IndexWriter` lay it out (little-endian): the 9-byte magic
b"MMIDIDX\\x00\\x00", the version (uint64, 1), the dtype code of the token ids (uint8: 1 uint8, 2 int8, 3 int16,
4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), the number of sequences S and of document boundaries D
(uint64 each), then S int32 sequence lengths, S int64 byte offsets of the sequences in PREFIX.bin, and D int64
document boundaries (indices into the sequences, 0 first, S last). A document is its sequences back to back.

The format records neither the tokenizer nor a checksum: the ids are checked against data.tokenizer's vocabulary
where data.verify hashes hai-data files (every id read once), and the files' identity (for the held-out split and
exact resume) is a hash of the index's head and tail and both sizes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document boundaries
DTYPES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}  # integer codes only: token ids
FIX = "re-create it with Megatron-LM's tools/preprocess_data.py, or encode the text with hai-data"
_IDENTITY_BYTES = 1 << 20  # of the index's head and tail, hashed for the files' identity


def is_megatron(prefix: str | Path) -> bool:
    """Whether PREFIX.idx starts with Megatron's magic."""
    try:
        with open(Path(f"{prefix}.idx"), "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class MegatronTokenFile:
    """A Megatron indexed dataset with the interface of data/preprocess.py's `TokenFile` (`doc(i)` a zero-copy view
    of the memory-mapped PREFIX.bin, `offsets`, `doc_lengths`, `verify_blocks`, `checksum` as an identity)."""

    def __init__(self, prefix: str | Path, vocab_size: int) -> None:
        self.prefix = Path(prefix).expanduser()
        idx, bin_ = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for path in (idx, bin_):
            if not path.is_file():
                raise DataError(f"{path}: Megatron dataset file not found; {FIX}")
        with open(idx, "rb") as f:
            raw = f.read(HEAD.size)
        if len(raw) < HEAD.size:
            raise DataError(f"{idx}: truncated ({len(raw)} bytes, the header alone is {HEAD.size}); {FIX}")
        magic, version, code, n_seq, n_bounds = HEAD.unpack(raw)
        if magic != MAGIC:
            raise DataError(f"{idx}: not a Megatron index (magic {magic!r}); {FIX}")
        if version != VERSION:
            raise DataError(f"{idx}: Megatron index version {version}, this code reads version {VERSION}; {FIX}")
        if code not in DTYPES:
            kind = "floating-point, not token ids" if code in (6, 7) else "unknown"
            raise DataError(f"{idx}: dtype code {code} ({kind}); token ids need one of {sorted(DTYPES)} "
                            "(4 int32, 8 uint16, ...)")
        self.dtype = np.dtype(DTYPES[code])
        size = HEAD.size + n_seq * (4 + 8) + n_bounds * 8
        if idx.stat().st_size < size:
            raise DataError(f"{idx}: truncated ({idx.stat().st_size} bytes, {n_seq} sequences and {n_bounds} "
                            f"document boundaries need {size}); {FIX}")
        lengths = np.memmap(idx, dtype="<i4", mode="r", offset=HEAD.size, shape=(n_seq,))
        pointers = np.memmap(idx, dtype="<i8", mode="r", offset=HEAD.size + 4 * n_seq, shape=(n_seq,))
        bounds = np.memmap(idx, dtype="<i8", mode="r", offset=HEAD.size + 12 * n_seq, shape=(n_bounds,))
        item = self.dtype.itemsize
        n_tokens = int(lengths.astype(np.int64).sum())
        if bin_.stat().st_size != n_tokens * item:
            raise DataError(f"{bin_}: {bin_.stat().st_size} bytes, the index's {n_tokens} tokens of {item} bytes need "
                            f"{n_tokens * item}; {FIX}")
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]) * item
        if n_seq and not np.array_equal(np.asarray(pointers), starts):
            raise DataError(f"{idx}: sequences are not stored back to back in {bin_.name} (pointers differ from the "
                            f"lengths' running sum); {FIX}")
        if n_bounds < 1 or bounds[0] != 0 or bounds[-1] != n_seq or (np.diff(np.asarray(bounds)) < 0).any():
            raise DataError(f"{idx}: document boundaries are not increasing from 0 to {n_seq}; {FIX}")
        token_starts = np.concatenate([starts // item, [n_tokens]]).astype(np.int64)
        self.offsets = token_starts[np.asarray(bounds)]  # [documents + 1], in tokens
        self.n_docs, self.n_tokens = n_bounds - 1, n_tokens
        self.tokens = np.memmap(bin_, dtype=self.dtype, mode="r", shape=(n_tokens,)) if n_tokens \
            else np.zeros(0, self.dtype)
        self.vocab_size = vocab_size  # the tokenizer's: the ids are checked against it by verify()
        self.fingerprint = None  # the format does not record the tokenizer
        self.checksum = _identity(idx, bin_)
        self.fix = FIX

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} of {self.n_docs} in {self.prefix}")
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def verify(self) -> None:
        for _ in self.verify_blocks():
            pass

    def verify_blocks(self, block: int = 1 << 24) -> Iterator[int]:
        """Every token id in [0, vocab_size), one block of PREFIX.bin at a time: yields the bytes checked so far."""
        step = max(1, block // self.dtype.itemsize)
        for a in range(0, self.n_tokens, step):
            ids = np.asarray(self.tokens[a:a + step])
            low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"{self.prefix}.bin: token id {high if high >= self.vocab_size else low} outside "
                                f"data.tokenizer's vocabulary of {self.vocab_size}; it was made with another "
                                "tokenizer: set data.tokenizer to that one")
            yield (a + ids.size) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"MegatronTokenFile({str(self.prefix)!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens}, {self.dtype})"


def _identity(idx: Path, bin_: Path) -> bytes:
    """16 bytes naming the files' content for seeding and resume checks (the format has no checksum)."""
    h = hashlib.blake2b(digest_size=16)
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        h.update(f.read(_IDENTITY_BYTES))
        f.seek(max(0, size - _IDENTITY_BYTES))
        h.update(f.read(_IDENTITY_BYTES))
    h.update(f"{size}:{bin_.stat().st_size}".encode())
    return h.digest()
