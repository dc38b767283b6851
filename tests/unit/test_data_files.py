"""Tokenizer, hai-data token files and the default corpus cache (data/tokenizer.py, preprocess.py, corpus.py)."""

from __future__ import annotations

import argparse
import json
import string
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

import data.preprocess
from data import DataError
from data.config import DataConfig
from data.corpus import prepare_default_corpus, select_corpus
from data.preprocess import TokenFile, TokenFileWriter, main, preprocess
from data.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = [Path(m.__file__).read_text() for m in (argparse, json.decoder, string, textwrap)]
TRICKY = ["", " ", "héllo wörld 😀 中文\n", "a\tb\r\nc  \n\n\n", "<|eos|> is text here", "x" * 1000, "\x00\x7f"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=500)


@pytest.fixture(scope="module")
def tok_path(tok: Tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


# ---- tokenizer ------------------------------------------------------------------------------------------------
def test_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS + TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and max(ids) < tok.vocab_size <= 500
    for token, i in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([i]) == token
        assert i not in tok.encode(f"a {token} b")  # literal special text in a document stays text


def test_save_load(tok: Tokenizer, tok_path: Path) -> None:
    loaded = Tokenizer.load(tok_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.fingerprint == tok.fingerprint
    assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="junk.json: not a tokenizer"):
        Tokenizer.load(tmp_path / "junk.json")
    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"]))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(DataError, match=r"plain.json: .*lacks .*<\|bos\|>.*<\|fim_end\|>"):
        Tokenizer.load(tmp_path / "plain.json")
    with pytest.raises(ValueError, match="at least 262"):
        Tokenizer.train(TEXTS, vocab_size=100)


# ---- token files ----------------------------------------------------------------------------------------------
@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.py").write_text(text)
    (folder / "empty.md").write_text("")
    (folder / ".hidden").write_text("skipped")
    return folder


def documents(tf: TokenFile) -> list[list[int]]:
    return [tf.doc(i).tolist() for i in range(tf.n_docs)]


def test_token_file_round_trip_and_workers(tok: Tokenizer, inputs: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data.preprocess, "CHUNK_CHARS", 5000)  # enough chunks for the worker pool to start
    one = preprocess([inputs], tok, tmp_path / "w1", workers=1)
    two = preprocess([inputs], tok, tmp_path / "w2", workers=2)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    tf = TokenFile(tmp_path / "w1")
    assert documents(tf) == [tok.encode(t) for t in TEXTS]  # sorted names 0..3.py; empty.md and .hidden dropped
    assert (one.n_docs, one.n_tokens) == (two.n_docs, two.n_tokens) == (tf.n_docs, tf.n_tokens)
    assert tf.dtype == np.uint16 and tf.fingerprint == tok.fingerprint and tf.vocab_size == tok.vocab_size


def test_txt_and_jsonl_inputs(tok: Tokenizer, tmp_path: Path) -> None:
    docs = ["first doc\n\nstill the first", "second\n \nsecond again", "third", "crlf\r\n\r\nfourth"]
    txt = "\n\n\n".join(docs[:2]) + "\n\n \n\n" + docs[2] + "\r\n\r\n\t\r\n" + docs[3] + "\n\n\n \n"
    (tmp_path / "a.txt").write_bytes(txt.encode())
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    preprocess([tmp_path / "a.txt", tmp_path / "b.jsonl"], tok, tmp_path / "out", text_field="body")
    assert documents(TokenFile(tmp_path / "out")) == [tok.encode(d) for d in docs + docs]
    with pytest.raises(DataError, match=r"b.jsonl:1: no string field 'text'"):
        preprocess([tmp_path / "b.jsonl"], tok, tmp_path / "bad")
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob("*.tmp"))


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    docs = [np.array([0, 70_000, 5]), np.array([65_536])]
    writer = TokenFileWriter(tmp_path / "big", vocab_size=80_000, fingerprint=bytes(16))
    for d in docs:
        writer.add(d, [len(d)])
    writer.finish()
    tf = TokenFile(tmp_path / "big")
    assert tf.dtype == np.uint32 and documents(tf) == [d.tolist() for d in docs]


def _corrupt_payload(prefix: Path) -> None:
    data = bytearray(prefix.with_suffix(".bin").read_bytes())
    data[len(data) // 2] ^= 1
    prefix.with_suffix(".bin").write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-2])


def _bad_magic(prefix: Path) -> None:
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(b"NOTMAGIC" + idx.read_bytes()[8:])


@pytest.mark.parametrize("damage, file, message", [
    (_corrupt_payload, "tf.bin/.idx", "checksum mismatch"),
    (lambda p: _truncate(p.with_suffix(".bin")), "tf.bin", "truncated"),
    (lambda p: _truncate(p.with_suffix(".idx")), "tf.idx", "truncated"),
    (_bad_magic, "tf.idx", "not a hai-data token index"),
    (lambda p: p.with_suffix(".bin").unlink(), "tf.bin", "not found"),
])
def test_damaged_token_file(tok: Tokenizer, inputs: Path, tmp_path: Path, damage, file: str, message: str) -> None:
    prefix = tmp_path / "tf"
    preprocess([inputs], tok, prefix)
    damage(prefix)
    with pytest.raises(DataError, match=f"{file}: .*{message}.*hai-data"):
        TokenFile(prefix)


def test_checksum_check_can_be_skipped(tok: Tokenizer, inputs: Path, tmp_path: Path) -> None:
    preprocess([inputs], tok, tmp_path / "tf")
    _corrupt_payload(tmp_path / "tf")
    assert TokenFile(tmp_path / "tf", verify=False).n_docs == len(TEXTS)


def test_cli(inputs: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(data.preprocess, "CHUNK_CHARS", 5000)
    tok_file, out = tmp_path / "t.json", tmp_path / "cli"
    argv = [str(inputs), "--output", str(out), "--tokenizer", str(tok_file), "--no-progress"]
    assert main(argv + ["--train-vocab", "300", "--workers", "2"]) == 0
    assert "4 documents" in capsys.readouterr().out
    tok = Tokenizer.load(tok_file)
    assert documents(TokenFile(out)) == [tok.encode(t) for t in TEXTS]
    assert main(argv + ["--train-vocab", "300"]) == 1  # refuses to overwrite the tokenizer
    assert main([str(tmp_path / "missing"), "--output", str(out), "--tokenizer", str(tok_file)]) == 1
    assert "missing: input not found" in capsys.readouterr().err


# ---- default corpus -------------------------------------------------------------------------------------------
def test_corpus_selection_is_deterministic_and_bounded() -> None:
    first = select_corpus(300_000)
    assert first == select_corpus(300_000) and sum(take for _, take in first) == 300_000
    stdlib = [path for path, _ in first if path.suffix == ".py"]
    assert stdlib == sorted(stdlib)
    assert all("site-packages" not in p.parts for p, _ in select_corpus(2_000_000))


def test_prepare_default_corpus_caches(tmp_path: Path) -> None:
    cfg = DataConfig(corpus_bytes=200_000, vocab_size=512, cache_dir=str(tmp_path), preprocess_workers=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_default_corpus(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    tok_path, [prefix] = results[0]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [tok_path.parent.name]  # built once, no temp left
    stamp = Path(prefix + ".bin").stat().st_mtime_ns
    assert prepare_default_corpus(cfg) == results[0] and Path(prefix + ".bin").stat().st_mtime_ns == stamp
    tok, tf = Tokenizer.load(tok_path), TokenFile(prefix)
    assert tok.vocab_size <= 512 and tf.fingerprint == tok.fingerprint
    texts = [path.read_bytes().decode(errors="replace") for path, _ in select_corpus(200_000)[:3]]
    assert documents(tf)[:3] == [tok.encode(t) for t in texts]
    other, _ = prepare_default_corpus(DataConfig(corpus_bytes=200_000, vocab_size=600, cache_dir=str(tmp_path),
                                                 preprocess_workers=1))
    assert other.parent != tok_path.parent
