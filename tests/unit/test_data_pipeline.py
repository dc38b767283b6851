"""The training data pipeline (data/dataset.py): packing, FIM, blending, held-out split, sampler and its state.

The token files are synthetic: document i of a dataset uses only its own band of token ids, so every token of a
sample tells which dataset and document it came from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError
from data.config import DataConfig
from data.dataset import DataPipeline, build_data, check_vocab, split_documents
from data.preprocess import TokenFile, TokenFileWriter
from data.tokenizer import Tokenizer

N_DOCS, BAND = 30, 6  # documents per dataset, token ids per document
FIRST_ID = 8  # above the special tokens


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train([Path(np.__file__).read_text(), Path(json.__file__).read_text()] * 3, vocab_size=600).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path: Path) -> Tokenizer:
    return Tokenizer.load(tok_path)


def owner(token: int, dataset_offset: int = 0) -> int:
    return (token - FIRST_ID - dataset_offset) // BAND


def write_dataset(prefix: Path, tok: Tokenizer, dataset: int, seed: int) -> list[np.ndarray]:
    """N_DOCS documents of 1..120 tokens; document i of dataset k draws from ids FIRST_ID + (k*N_DOCS + i)*BAND..."""
    rng = np.random.default_rng(seed)
    docs = [FIRST_ID + (dataset * N_DOCS + i) * BAND + rng.integers(0, BAND, size=rng.integers(1, 120))
            for i in range(N_DOCS)]
    assert docs[-1].max() < tok.vocab_size
    writer = TokenFileWriter(prefix, tok.vocab_size, tok.fingerprint)
    for d in docs:
        writer.add(d, [len(d)])
    writer.finish()
    return docs


@pytest.fixture(scope="module")
def two_files(tok: Tokenizer, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("data")
    for k in range(2):
        write_dataset(folder / f"d{k}", tok, k, seed=k)
    return [str(folder / "d0"), str(folder / "d1")]


@pytest.fixture(scope="module")
def files(two_files: list[str]) -> list[str]:
    return two_files[:1]


def pipeline(tok_path: Path, files: list[str], seed: int = 0, rank: int = 0, size: int = 1, **cfg) -> DataPipeline:
    values = dict(datasets=files, tokenizer=str(tok_path), seq_len=16, fim_rate=0.0, valid_fraction=0.1)
    return build_data(DataConfig(**{**values, **cfg}), seed=seed, dp_rank=rank, dp_size=size)


def undo_psm(doc: list[int], tok: Tokenizer) -> list[int]:
    """The reference inverse of FIM: <|fim_begin|> P <|fim_hole|> S <|fim_end|> M  ->  P M S."""
    assert doc[0] == tok.fim_begin_id and doc.count(tok.fim_hole_id) == doc.count(tok.fim_end_id) == 1
    hole, end = doc.index(tok.fim_hole_id), doc.index(tok.fim_end_id)
    assert 0 < hole < end
    return doc[1:hole] + doc[end + 1:] + doc[hole + 1:end]


def split_on(stream: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for t in stream:
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs  # the tail after the last eos (a cut document) is dropped


# ---- packing and FIM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fim_rate", [0.0, 0.5, 1.0])
def test_pass_is_the_document_stream(tok_path: Path, files: list[str], tok: Tokenizer, fim_rate: float) -> None:
    source = pipeline(tok_path, files, fim_rate=fim_rate).sources[0]
    tf = TokenFile(files[0])
    for p in range(3):
        packed = source.packed_pass(p)
        stream = np.concatenate([packed.sample(i) for i in range(packed.n_samples)]).tolist()
        assert len(stream) == packed.n_samples * 17
        docs = split_on(stream, tok.eos_id)
        assert len(docs) == (packed.ends <= len(stream)).sum() > len(packed.order) - 5  # all but the cut tail
        for q, doc in enumerate(docs):
            original = tf.doc(int(packed.order[q])).tolist()
            assert (undo_psm(doc, tok) if packed.fim[q] else doc) == original
        if fim_rate in (0, 1):
            assert (packed.fim == fim_rate).all()
        fim_tokens = {tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id} & set(stream)
        assert bool(fim_tokens) == (fim_rate > 0)
        assert sorted(packed.order) == sorted(source.train_ids)


def test_fim_rate_is_binomial(tok_path: Path, files: list[str]) -> None:
    source = pipeline(tok_path, files, fim_rate=0.1).sources[0]
    flags = np.concatenate([source.packed_pass(p).fim for p in range(60)])
    n, expected = len(flags), 0.1 * len(flags)
    assert abs(flags.sum() - expected) < 4 * math.sqrt(n * 0.1 * 0.9)


def test_batches_are_shifted_samples(tok_path: Path, files: list[str]) -> None:
    pipe = pipeline(tok_path, files, fim_rate=0.5)
    tokens, labels = pipe.next_batch(5)
    assert tokens.shape == labels.shape == (5, 16) and tokens.dtype == labels.dtype == torch.long
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    assert torch.equal(torch.cat([tokens, labels[:, -1:]], 1), torch.from_numpy(np.stack([pipe.sample(g)
                                                                                           for g in range(5)])))


# ---- validation split -----------------------------------------------------------------------------------------
def test_validation_documents_never_train(tok_path: Path, files: list[str]) -> None:
    pipe = pipeline(tok_path, files, fim_rate=0.5, valid_fraction=0.2)
    valid, train = split_documents(TokenFile(files[0]), 0.2)
    assert len(valid) == 6 and len(train) == N_DOCS - 6
    seen = set()
    for _ in range(2 * pipe.samples_per_epoch // 8):
        seen |= {owner(t) for t in pipe.next_batch(8)[0].flatten().tolist() if t >= FIRST_ID}
    assert seen <= set(train.tolist()) and len(seen) >= len(train) - 1  # a short document may sit in a cut tail
    batches = pipe.valid_batches(3, 4)
    held_out = {owner(t) for tokens, _ in batches for t in tokens.flatten().tolist() if t >= FIRST_ID}
    assert held_out <= set(valid.tolist()) and len(batches) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, pipe.valid_batches(3, 4)))


def test_no_validation_sample_is_an_error(tok_path: Path, files: list[str]) -> None:
    with pytest.raises(DataError, match="data.valid_fraction"):
        pipeline(tok_path, files, valid_fraction=0.0).valid_batches(1, 1)


# ---- blending -------------------------------------------------------------------------------------------------
def test_blend_proportions(tok_path: Path, two_files: list[str]) -> None:
    natural = pipeline(tok_path, two_files, valid_fraction=0.0)
    assert natural.counts == [s.n_samples for s in natural.sources]
    pipe = pipeline(tok_path, two_files, weights=[3.0, 1.0])
    n = pipe.samples_per_epoch
    assert pipe.counts[0] + pipe.counts[1] == n and abs(pipe.counts[0] - 0.75 * n) <= 1
    epoch = [owner(int(pipe.sample(g).max())) >= N_DOCS for g in range(n)]  # True = dataset 1
    assert sum(epoch) == pipe.counts[1]
    k = 100  # a prefix of the shuffled epoch is a draw without replacement: hypergeometric spread
    sd = math.sqrt(k * 0.25 * 0.75 * (n - k) / (n - 1))
    assert abs(sum(epoch[:k]) - 0.25 * k) < 4 * sd


# ---- sampler --------------------------------------------------------------------------------------------------
def test_same_seed_same_batches(tok_path: Path, files: list[str]) -> None:
    a, b, c = (pipeline(tok_path, files, seed=s, fim_rate=0.3) for s in (7, 7, 8))
    for _ in range(3):
        x, y, z = a.next_batch(4), b.next_batch(4), c.next_batch(4)
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(x[0], z[0])


def test_ranks_cover_each_epoch_once(tok_path: Path, files: list[str]) -> None:
    single = pipeline(tok_path, files, fim_rate=0.3)
    n = single.samples_per_epoch
    epoch_rows = sorted(single.sample(g).tobytes() for g in range(n))
    source = single.sources[0]
    assert epoch_rows == sorted(source.sample(j).tobytes() for j in range(n))  # one pass, reordered
    assert [single.sample(g).tobytes() for g in range(n)] != [source.sample(j).tobytes() for j in range(n)]
    size, mb = 3, 2
    ranks = [pipeline(tok_path, files, fim_rate=0.3, rank=r, size=size) for r in range(size)]
    for step in range(math.ceil(n / (size * mb)) + 2):  # past the end of epoch 0
        together = torch.cat([r.next_batch(mb)[0] for r in ranks]).numpy()
        expected = [single.sample(g)[:-1] for g in range(step * size * mb, (step + 1) * size * mb)]
        assert sorted(map(bytes, together)) == sorted(map(bytes, expected))  # the single-process batch
    assert all(r.epoch == 1 for r in ranks)


def test_state_round_trip_across_epoch_boundary(tok_path: Path, files: list[str]) -> None:
    a = pipeline(tok_path, files, fim_rate=0.3, seed=3)
    n = a.samples_per_epoch
    a.position = n - 5
    state = json.loads(json.dumps(a.state_dict()))
    b = pipeline(tok_path, files, fim_rate=0.3, seed=3)
    b.load_state_dict(state)
    for _ in range(4):  # crosses into epoch 1 at the second batch
        x, y = a.next_batch(3), b.next_batch(3)
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert state["epoch"] == 0 and a.state_dict()["epoch"] == 1 and a.state_dict() == b.state_dict()
    source = a.sources[0]

    def order(e: int) -> list[int]:  # which sample of pass e each position of epoch e holds
        where = {source.sample(e * n + j).tobytes(): j for j in range(n)}
        return [where[a.sample(e * n + g).tobytes()] for g in range(n)]

    assert sorted(order(0)) == sorted(order(1)) == list(range(n)) and order(0) != order(1)  # reshuffled
    with pytest.raises(DataError, match="seed"):
        pipeline(tok_path, files, fim_rate=0.3, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="data"):
        pipeline(tok_path, files, fim_rate=0.2, seed=3).load_state_dict(state)


def test_state_moves_to_another_dp_size(tok_path: Path, files: list[str]) -> None:
    two = [pipeline(tok_path, files, rank=r, size=2) for r in range(2)]
    for p in two:
        p.next_batch(3)
    state = two[0].state_dict()
    single = pipeline(tok_path, files)
    single.load_state_dict(state)
    four = pipeline(tok_path, files, rank=1, size=4)
    with pytest.raises(DataError, match="dp_size"):
        four.load_state_dict(state)  # 6 samples read cannot be split over 4 ranks
    nxt = torch.cat([p.next_batch(1)[0] for p in two])
    assert torch.equal(single.next_batch(2)[0], nxt)


# ---- cross-checks ---------------------------------------------------------------------------------------------
def test_vocab_check() -> None:
    check_vocab(500, 500)
    check_vocab(500, 512)
    with pytest.raises(DataError, match=r"data.tokenizer.*model.vocab_size is 400.*>= 500"):
        check_vocab(500, 400)


def test_config_errors(tok_path: Path, files: list[str], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.tokenizer"):
        build_data(DataConfig(datasets=files), seed=0)
    other = tmp_path / "other.json"
    Tokenizer.train(["something else entirely"] * 10, vocab_size=300).save(other)
    with pytest.raises(DataError, match=r"data.datasets\[0\].*another tokenizer"):
        pipeline(other, files)
    with pytest.raises(DataError, match="data.seq_len"):
        pipeline(tok_path, files, seq_len=100_000)
