"""hai-data: text files -> a memory-mapped token file plus a document index (paper 4.1, the pre-training corpus).

    hai-data docs/ more.jsonl --tokenizer tok.json --output data/corpus [--workers 4] [--train-vocab 8192]
    python -m data.preprocess ...                      # the same

Inputs are files or directories (searched recursively for `--glob`, hidden entries skipped, sorted):
  - `*.jsonl`: one JSON object per line, the document in its `--text-field` (default "text"); blank lines skipped;
  - `*.txt`:   several documents, separated by two or more blank lines in a row (a single blank line is a
               paragraph break inside a document); whitespace-only lines count as blank;
  - any other file is one document (source code, markdown, ...). Files are read as UTF-8 (bad bytes replaced).
Empty documents are skipped. No <|eos|> is written: the data pipeline appends it at pack time, after the
optional FIM rewrite of the document (data/dataset.py).

Format of PREFIX.idx (all little-endian), followed by PREFIX.bin, the raw token ids of every document back to back:

    offset  size          field
    0       8             magic b"HAITOKS\\0"
    8       4             format version (uint32), FORMAT_VERSION
    12      4             bytes per token id (uint32): 2 = uint16 (vocab <= 65536), 4 = uint32
    16      8             number of documents D (uint64)
    24      8             number of tokens T (uint64)
    32      8             vocabulary size of the tokenizer (uint64)
    40      16            tokenizer fingerprint (Tokenizer.fingerprint: blake2b-128 of its vocabulary)
    56      16            checksum: blake2b-128 of PREFIX.bin's bytes followed by the offsets' bytes
    72      8 * (D + 1)   document offsets in tokens (uint64): document i is tokens[offsets[i]:offsets[i+1]]

Several worker processes (`--workers`, spawned, so safe after threads and torch) encode chunks of documents
(inputs under two chunks per worker are encoded in-process); chunks are written in input order, so the files
are byte-identical for any worker count. Both files are written
under temporary names and renamed at the end (.bin first, then .idx), so a half-written file is never read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import re
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import DataError
from data.tokenizer import Tokenizer

MAGIC = b"HAITOKS\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQQ16s16s")  # magic, version, itemsize, docs, tokens, vocab, fingerprint, checksum
CHUNK_CHARS = 1 << 18  # text per worker task: large enough to amortise pickling, small enough to balance
REWRITE_HINT = "re-create it with hai-data (hai-data INPUTS --tokenizer TOKENIZER --output PREFIX)"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---- writing --------------------------------------------------------------------------------------------------
class TokenFileWriter:
    """Streams documents into PREFIX.bin / PREFIX.idx; `finish()` writes the index and renames both into place."""

    def __init__(self, prefix: str | Path, vocab_size: int, fingerprint: bytes):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.fingerprint, self.dtype = vocab_size, fingerprint, token_dtype(vocab_size)
        self._tmp_bin = _with_suffix(self.prefix, ".bin.tmp")
        self._tmp_idx = _with_suffix(self.prefix, ".idx.tmp")
        self._bin = open(self._tmp_bin, "wb")  # closed by finish() or abort()
        self._hash = hashlib.blake2b(digest_size=16)
        self._lengths: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray | list[int]) -> None:
        """Append documents given back to back in `tokens`, with their token counts in `lengths`."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != len(tokens) or (lengths <= 0).any():
            raise ValueError(f"lengths (sum {lengths.sum()}) must be positive and add up to the {len(tokens)} tokens")
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of {self.vocab_size}")
        payload = tokens.tobytes()
        self._bin.write(payload)
        self._hash.update(payload)
        self._lengths.append(lengths)

    @property
    def n_docs(self) -> int:
        return sum(len(x) for x in self._lengths)

    @property
    def n_tokens(self) -> int:
        return sum(int(x.sum()) for x in self._lengths)

    def finish(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<u8")
        self._hash.update(offsets.tobytes())
        header = HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, len(lengths), int(offsets[-1]),
                             self.vocab_size, self.fingerprint, self._hash.digest())
        self._tmp_idx.write_bytes(header + offsets.tobytes())
        self._tmp_bin.replace(_with_suffix(self.prefix, ".bin"))
        self._tmp_idx.replace(_with_suffix(self.prefix, ".idx"))

    def abort(self) -> None:
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)


# ---- reading --------------------------------------------------------------------------------------------------
class TokenFile:
    """A token file opened read-only: `doc(i)` is a zero-copy numpy view into the memory-mapped PREFIX.bin.

    Opening checks the header, both files' sizes and the offsets; `verify` also hashes PREFIX.bin against the
    recorded checksum (reading the whole file: the training start does it on the ranks data.verify names)."""

    def __init__(self, prefix: str | Path, verify: bool = True, fix: str = REWRITE_HINT):
        self.prefix = Path(prefix).expanduser()
        idx, bin_ = _with_suffix(self.prefix, ".idx"), _with_suffix(self.prefix, ".bin")
        for path in (idx, bin_):
            if not path.is_file():
                raise DataError(f"{path}: token file not found; {fix}")
        raw = idx.read_bytes()[:HEADER.size]
        if len(raw) < HEADER.size:
            raise DataError(f"{idx}: truncated ({len(raw)} bytes, the header alone is {HEADER.size}); {fix}")
        magic, version, itemsize, n_docs, n_tokens, vocab, fingerprint, checksum = HEADER.unpack(raw)
        if magic != MAGIC:
            raise DataError(f"{idx}: not a hai-data token index (magic {magic!r}, expected {MAGIC!r}); {fix}")
        if version != FORMAT_VERSION or itemsize not in (2, 4):
            raise DataError(f"{idx}: format version {version} / {itemsize}-byte ids, this code reads version "
                            f"{FORMAT_VERSION} with 2- or 4-byte ids; {fix}")
        self._expect_size(idx, HEADER.size + 8 * (n_docs + 1), fix)
        self._expect_size(bin_, itemsize * n_tokens, fix)
        self.n_docs, self.n_tokens, self.vocab_size, self.fingerprint, self.checksum = \
            n_docs, n_tokens, vocab, fingerprint, checksum
        self.dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
        self.offsets = np.memmap(idx, dtype="<u8", mode="r", offset=HEADER.size, shape=(n_docs + 1,))
        self.tokens = (np.memmap(bin_, dtype=self.dtype, mode="r", shape=(n_tokens,)) if n_tokens
                       else np.zeros(0, self.dtype))
        self.fix = fix
        if verify:
            self.verify()
        if self.offsets[0] != 0 or self.offsets[-1] != n_tokens or (np.diff(self.offsets.astype(np.int64)) < 0).any():
            raise DataError(f"{idx}: document offsets are not increasing from 0 to {n_tokens}; {fix}")

    @staticmethod
    def _expect_size(path: Path, size: int, fix: str) -> None:
        actual = path.stat().st_size
        if actual != size:
            state = "truncated" if actual < size else "longer than its header says"
            raise DataError(f"{path}: {state} ({actual} bytes, expected {size}); {fix}")

    def verify(self) -> None:
        """Hash the files against the checksum hai-data recorded; a DataError naming them and the fix if it differs."""
        for _ in self.verify_blocks():
            pass

    def verify_blocks(self, block: int = 1 << 24) -> Iterator[int]:
        """`verify`, one block of PREFIX.bin at a time: yields the bytes hashed so far after each block."""
        h, done, buffer = hashlib.blake2b(digest_size=16), 0, bytearray(block)
        with open(_with_suffix(self.prefix, ".bin"), "rb", buffering=0) as f:
            while size := f.readinto(buffer):
                h.update(memoryview(buffer)[:size])
                done += size
                yield done
        h.update(np.ascontiguousarray(self.offsets, dtype="<u8").tobytes())
        if h.digest() != self.checksum:
            raise DataError(f"{self.prefix}.bin/.idx: checksum mismatch, the files are corrupt or were changed "
                            f"after writing; {self.fix}")

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets.astype(np.int64))  # [n_docs]

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} of {self.n_docs} in {self.prefix}")
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __repr__(self) -> str:
        return f"TokenFile({str(self.prefix)!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens}, {self.dtype})"


def _with_suffix(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


# ---- documents ------------------------------------------------------------------------------------------------
_TXT_SEPARATOR = re.compile(r"\r?\n(?:[ \t]*\r?\n){2,}")  # two or more blank lines


def expand_inputs(paths: Iterable[str | Path], glob: str = "*") -> list[Path]:
    """Files in input order; a directory contributes its non-hidden files matching `glob`, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = (f for f in path.rglob(glob) if f.is_file())
            files += sorted(f for f in found if not any(p.startswith(".") for p in f.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: input not found; give hai-data existing files or directories")
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(document, input bytes it used) pairs of one file, following the conventions in the module docstring."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(path, lineno, line, text_field), len(line)
        return
    text = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix != ".txt":
        yield text, path.stat().st_size
        return
    for part in _TXT_SEPARATOR.split(text):
        yield (part.strip("\r\n") if part.strip() else ""), len(part.encode())


def _jsonl_text(path: Path, lineno: int, line: bytes, field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as err:  # bad JSON or bad UTF-8
        raise DataError(f"{path}:{lineno}: not valid JSON ({err}); each line of a .jsonl file is one object") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f"{path}:{lineno}: no string field {field!r}; name the text field with --text-field")
    return record[field]


def _chunks(docs: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    """Consecutive documents grouped into about CHUNK_CHARS characters each, with their input bytes."""
    texts, size, nbytes = [], 0, 0
    for text, used in docs:
        nbytes += used
        if text:
            texts.append(text)
            size += len(text)
        if size >= CHUNK_CHARS:
            yield texts, nbytes
            texts, size, nbytes = [], 0, 0
    if texts or nbytes:
        yield texts, nbytes


# ---- encoding -------------------------------------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json, source="<hai-data worker>")


def _encode_chunk(chunk: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray, int]:
    return _encode(_worker_tokenizer, chunk)


def _encode(tokenizer: Tokenizer, chunk: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Concatenated token ids and per-document lengths of a chunk (empty encodings dropped), one thread."""
    texts, nbytes = chunk
    ids = [tokenizer.encode(t) for t in texts]  # encode, not encode_batch: one core per worker
    ids = [i for i in ids if i]
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = np.concatenate([np.array(i, dtype=dtype) for i in ids]) if ids else np.zeros(0, dtype)
    return tokens, np.array([len(i) for i in ids], dtype=np.int64), nbytes


@dataclass
class PreprocessStats:
    n_docs: int
    n_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


def preprocess(inputs: Iterable[str | Path], tokenizer: Tokenizer, prefix: str | Path, workers: int = 1,
               text_field: str = "text", glob: str = "*", progress: bool | None = None) -> PreprocessStats:
    """Encode every document of the input files into PREFIX.bin / PREFIX.idx (conventions in the module docstring).

    progress: None shows a bar only on a terminal."""
    files = expand_inputs(inputs, glob)
    docs = (d for f in files for d in read_documents(f, text_field))
    return encode_documents(docs, tokenizer, prefix, workers, sum(f.stat().st_size for f in files), progress)


def encode_documents(docs: Iterable[tuple[str, int]], tokenizer: Tokenizer, prefix: str | Path, workers: int = 1,
                     total_bytes: int | None = None, progress: bool | None = None) -> PreprocessStats:
    """Encode (text, input bytes) pairs in order into PREFIX.bin / PREFIX.idx with up to `workers` processes.

    The worker pool starts only when the input has at least two chunks (CHUNK_CHARS) per worker: below that,
    starting processes costs more than it saves, and the text is encoded in this process."""
    start = time.perf_counter()
    writer = TokenFileWriter(prefix, tokenizer.vocab_size, tokenizer.fingerprint)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="hai-data",
               disable=None if progress is None else not progress)
    chunks, pool = _chunks(docs), None
    try:
        first = list(islice(chunks, 2 * workers))
        if workers > 1 and len(first) == 2 * workers:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer.to_str(),))
        for tokens, lengths, nbytes in _encoded(chain(first, chunks), tokenizer, pool, workers):
            writer.add(tokens, lengths)
            bar.update(nbytes)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return PreprocessStats(writer.n_docs, writer.n_tokens, time.perf_counter() - start)


def _encoded(chunks: Iterator, tokenizer: Tokenizer, pool, workers: int) -> Iterator:
    if pool is None:
        yield from (_encode(tokenizer, c) for c in chunks)
        return
    # A few chunks per worker at a time: Pool.imap alone would read the whole input ahead into memory.
    while window := list(islice(chunks, 4 * workers)):
        yield from pool.imap(_encode_chunk, window)


# ---- command line ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hai-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="text / .txt / .jsonl files or directories")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json to encode with (written by --train-vocab)")
    parser.add_argument("--train-vocab", type=int, default=None, metavar="N",
                        help="first train a byte-level BPE of N tokens on the inputs and save it to --tokenizer")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--text-field", default="text", help="JSON field holding a .jsonl document (default text)")
    parser.add_argument("--glob", default="*", help="files to take from input directories (default *)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        written = [Path(args.tokenizer)] + [_with_suffix(Path(args.output), s) for s in (".bin", ".idx")]
        outputs = {p.resolve() for p in written}  # never read this run's own outputs from an input directory
        files = [f for f in expand_inputs(args.inputs, args.glob) if f.resolve() not in outputs]
        tokenizer = _tokenizer(args, files)
        stats = preprocess(files, tokenizer, args.output, args.workers, args.text_field,
                           progress=False if args.no_progress else None)
    except (DataError, ValueError) as err:
        print(f"hai-data: error: {err}", file=sys.stderr)
        return 1
    print(f"hai-data: wrote {args.output}.bin/.idx: {stats.n_docs} documents, {stats.n_tokens} tokens "
          f"({token_dtype(tokenizer.vocab_size)}), {stats.tokens_per_s:,.0f} tokens/s with {args.workers} worker(s)")
    return 0


def _tokenizer(args: argparse.Namespace, files: list[Path]) -> Tokenizer:
    path = Path(args.tokenizer)
    if args.train_vocab is None:
        return Tokenizer.load(path)
    if path.exists():
        raise DataError(f"{path}: already exists; drop --train-vocab to use it, or remove it to train a new one")
    docs = (text for f in files for text, _ in read_documents(f, args.text_field))
    tokenizer = Tokenizer.train(docs, args.train_vocab)
    tokenizer.save(path)
    print(f"hai-data: trained a {tokenizer.vocab_size}-token byte-level BPE, saved to {path}")
    return tokenizer


if __name__ == "__main__":
    sys.exit(main())
