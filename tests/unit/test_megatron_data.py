"""Megatron-LM indexed datasets (data/megatron.py) read as they are: documents as written (several sequences per
document included), blended by weight with a hai-data token file, resumed exactly; a bad index fails naming the
file, its version or dtype code and the fix. The files are written here from the documented layout."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from data import DataError
from data.config import DataConfig
from data.dataset import build_data
from data.megatron import MegatronTokenFile
from tests.unit.test_data_pipeline import N_DOCS, owner, tok, tok_path, write_dataset  # noqa: F401 (fixtures)


def write_megatron(prefix: Path, docs: list[np.ndarray], dtype: str = "<i4", code: int = 4, version: int = 1,
                   split: int = 2) -> None:
    """Megatron's layout: magic, version, dtype code, sequence and boundary counts, lengths, pointers, boundaries;
    each document stored as `split` sequences (fewer when it is short)."""
    seqs, bounds = [], [0]
    for d in docs:
        parts = [p for p in np.array_split(d, min(split, len(d))) if len(p)]
        seqs += parts
        bounds.append(len(seqs))
    lengths = np.array([len(s) for s in seqs], dtype="<i4")
    item = np.dtype(dtype).itemsize
    pointers = (np.concatenate([[0], np.cumsum(lengths)[:-1]]) * item).astype("<i8")
    head = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", version, code, len(seqs), len(bounds))
    Path(f"{prefix}.idx").write_bytes(head + lengths.tobytes() + pointers.tobytes()
                                      + np.array(bounds, dtype="<i8").tobytes())
    Path(f"{prefix}.bin").write_bytes(np.concatenate(seqs).astype(dtype).tobytes())


@pytest.fixture(scope="module")
def mixed(tok, tmp_path_factory) -> tuple[list[str], list[np.ndarray]]:  # noqa: F811
    folder = tmp_path_factory.mktemp("mixed")
    write_dataset(folder / "ours", tok, 0, seed=0)
    docs = write_dataset(folder / "ref", tok, 1, seed=1)  # dataset 1's documents, in hai-data's format
    write_megatron(folder / "megatron", docs)
    return [str(folder / "ours"), str(folder / "megatron")], docs


def test_documents_read_as_written(mixed, tok):  # noqa: F811
    (_, prefix), docs = mixed
    tf = MegatronTokenFile(prefix, tok.vocab_size)
    assert tf.n_docs == N_DOCS and tf.n_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert np.array_equal(tf.doc(i), d)
    assert np.array_equal(tf.doc_lengths, [len(d) for d in docs])


def test_blended_with_a_token_file_and_resumed_exactly(mixed, tok_path):  # noqa: F811
    files, _ = mixed
    cfg = DataConfig(datasets=files, tokenizer=str(tok_path), seq_len=16, fim_rate=0.0, valid_fraction=0.1,
                     weights=[3.0, 1.0], verify="rank0")
    pipe = build_data(cfg, seed=0)
    n = pipe.samples_per_epoch
    assert abs(pipe.counts[0] - 0.75 * n) <= 1
    owners = [owner(int(pipe.sample(g).max())) >= N_DOCS for g in range(n)]  # True = the Megatron dataset
    assert sum(owners) == pipe.counts[1] > 0
    for _ in range(3):
        pipe.next_batch(4)
    state = pipe.state_dict()
    want = [pipe.next_batch(4) for _ in range(2)]
    again = build_data(cfg, seed=0)
    again.load_state_dict(state)
    for (a, b), (c, d) in zip(want, [again.next_batch(4) for _ in range(2)]):
        assert (a == c).all() and (b == d).all()


@pytest.mark.parametrize("change, match", [
    (dict(version=2), "version 2, this code reads version 1"),
    (dict(code=7, dtype="<f4"), "dtype code 7 .floating-point"),
    (dict(code=9), "dtype code 9 .unknown"),
])
def test_bad_index_is_named(mixed, tok, tmp_path, change, match):  # noqa: F811
    _, docs = mixed
    write_megatron(tmp_path / "bad", docs, **change)
    with pytest.raises(DataError, match=match):
        MegatronTokenFile(tmp_path / "bad", tok.vocab_size)


def test_truncated_gapped_and_out_of_vocabulary_files_are_named(mixed, tok, tok_path, tmp_path):  # noqa: F811
    _, docs = mixed
    write_megatron(tmp_path / "short", docs)
    idx = Path(f"{tmp_path / 'short'}.idx")
    idx.write_bytes(idx.read_bytes()[:-9])
    with pytest.raises(DataError, match=r"short\.idx: truncated"):
        MegatronTokenFile(tmp_path / "short", tok.vocab_size)
    write_megatron(tmp_path / "gap", docs)
    bin_ = Path(f"{tmp_path / 'gap'}.bin")
    bin_.write_bytes(bin_.read_bytes() + b"\0\0\0\0")
    with pytest.raises(DataError, match=r"gap\.bin: .* bytes"):
        MegatronTokenFile(tmp_path / "gap", tok.vocab_size)
    write_megatron(tmp_path / "wide", [d + tok.vocab_size if i == 3 else d for i, d in enumerate(docs)])
    cfg = DataConfig(datasets=[str(tmp_path / "wide")], tokenizer=str(tok_path), seq_len=16, fim_rate=0.0,
                     verify="rank0")
    with pytest.raises(DataError, match="outside data.tokenizer's vocabulary"):
        build_data(cfg, seed=0)
