"""The default corpus: real text that every machine has, nothing downloaded (stands in for paper 4.1's corpus).

What it is, in this order, up to `DataConfig.corpus_bytes` of input:
  1. the Python documentation's text sources where Debian's python3-doc is installed
     (/usr/share/doc/python3*/html/_sources/**/*.txt; if only the HTML pages are there, their text);
  2. the standard library's .py files (sysconfig's stdlib path, site-/dist-packages skipped).
Each file is one document; paths are sorted, so the selection is deterministic. Whole files are taken while
they fit the budget; the file that crosses it is cut at its last newline before the limit.

`prepare_default_corpus(cfg)` trains a byte-level BPE of `cfg.vocab_size` tokens on that text (or takes
`cfg.tokenizer`), encodes it with hai-data's writer, and caches both under `cfg.cache_dir` in a directory named
by a hash of (the selected files and sizes, corpus_bytes, vocab_size or the given tokenizer, the formats), so a
changed setting prepares a new one. It is built in a temporary directory and renamed into place under a file
lock, so several processes starting at once build it once; later calls only stat files (well under a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from glob import glob
from html.parser import HTMLParser
from pathlib import Path

from data import DataError
from data.config import DataConfig
from data.preprocess import FORMAT_VERSION, encode_documents
from data.tokenizer import Tokenizer

CORPUS_VERSION = 1  # bump when the selection or the preparation changes: old caches are then ignored
DOC_SOURCES = "/usr/share/doc/python3*/html/_sources/**/*.txt"
DOC_HTML = "/usr/share/doc/python3*/html/**/*.html"
Selection = list[tuple[Path, int]]  # (file, bytes to read from it)


# ---- which files ----------------------------------------------------------------------------------------------
def stdlib_sources() -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def python_doc_sources() -> list[Path]:
    """python3-doc's reStructuredText sources, else its HTML pages, else nothing; one entry per real file."""
    for pattern in (DOC_SOURCES, DOC_HTML):
        real = {Path(p).resolve() for p in glob(pattern, recursive=True) if "/_static/" not in p}
        files = sorted(p for p in real if p.is_file())
        if files:
            return files
    return []


def select_corpus(corpus_bytes: int) -> Selection:
    selection, total = [], 0
    for path in python_doc_sources() + stdlib_sources():
        take = min(path.stat().st_size, corpus_bytes - total)
        if take > 0:
            selection.append((path, take))
            total += take
        if total >= corpus_bytes:
            break
    return selection


def read_corpus_file(path: Path, take: int) -> str:
    data = path.read_bytes()
    if take < len(data):
        data = data[:take]
        data = data[:data.rfind(b"\n") + 1] or data  # end on a whole line when there is one
    text = data.decode("utf-8", errors="replace")
    return _html_text(text) if path.suffix == ".html" else text


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skipping += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"


# ---- the cache ------------------------------------------------------------------------------------------------
def corpus_key(selection: Selection, corpus_bytes: int, tokenizer: str) -> str:
    """Hash of everything the prepared files depend on; `tokenizer` is the vocab size or a tokenizer fingerprint."""
    facts = {"corpus": CORPUS_VERSION, "format": FORMAT_VERSION, "corpus_bytes": corpus_bytes,
             "tokenizer": tokenizer, "files": [[str(p), p.stat().st_size, take] for p, take in selection]}
    return hashlib.blake2b(json.dumps(facts).encode(), digest_size=8).hexdigest()


def prepare_default_corpus(cfg: DataConfig) -> tuple[Path, list[str]]:
    """(tokenizer.json, [token-file prefix]) of the default corpus, prepared on first use and cached."""
    selection = select_corpus(cfg.corpus_bytes)
    if not selection:
        raise DataError(f"no default corpus: no .py files under {sysconfig.get_paths()['stdlib']} and no python3-doc; "
                        "give token files in data.datasets (made by hai-data) and data.tokenizer")
    given = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    key = corpus_key(selection, cfg.corpus_bytes, given.fingerprint.hex() if given else str(cfg.vocab_size))
    root = Path(cfg.cache_dir).expanduser()
    final = root / f"corpus-{key}"
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".corpus-{key}.lock"):
            if not final.is_dir():  # another process may have built it while this one waited
                _build(selection, cfg, given, root, final)
    return final / "tokenizer.json", [str(final / "corpus")]


def _build(selection: Selection, cfg: DataConfig, given: Tokenizer | None, root: Path, final: Path) -> None:
    start = time.perf_counter()
    what = f"vocab {cfg.vocab_size}" if given is None else f"tokenizer {given.source}"
    print(f"data: preparing the default corpus ({len(selection)} files, {sum(t for _, t in selection) / 1e6:.1f} MB, "
          f"{what}) in {final}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        docs = [(read_corpus_file(path, take), take) for path, take in selection]
        tokenizer = given or Tokenizer.train((text for text, _ in docs), cfg.vocab_size)
        tokenizer.save(tmp / "tokenizer.json")
        stats = encode_documents(docs, tokenizer, tmp / "corpus", cfg.preprocess_workers, progress=False)
        manifest = {"corpus_bytes": cfg.corpus_bytes, "vocab_size": tokenizer.vocab_size, "documents": stats.n_docs,
                    "tokens": stats.n_tokens, "files": [[str(p), take] for p, take in selection]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # losing the rename race to another (lock-less) builder is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: default corpus ready: {stats.n_docs} documents, {stats.n_tokens} tokens, vocab "
          f"{tokenizer.vocab_size} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock where the OS has fcntl; elsewhere the atomic rename alone keeps the cache whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
