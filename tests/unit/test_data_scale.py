"""Data at DeepSeek-V3's scale (data/dataset.py): the O(1)-memory epoch order and the once-only checksum check.

The order is a keyed Feistel bijection computed per position; these tests check that it is a bijection for awkward
N, that seeds and epochs reshuffle it, that its shuffle is uniform enough, that it holds nothing proportional to N
(3.6e9 samples), and that the vectorised path equals the per-position one. The verification tests run several
"ranks" as threads with an in-process `agree`, so that one rank's failure is seen to stop all of them.
"""

from __future__ import annotations

import json
import math
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import data.dataset
from data import DataError
from data.config import DataConfig
from data.dataset import EpochOrder, Ranks, build_data, keyed_permutation, round_keys
from data.preprocess import TokenFile, TokenFileWriter
from data.tokenizer import Tokenizer

AWKWARD_N = [1, 2, 3, 5, 7, 31, 63, 64, 65, 97, 127, 128, 129, 1000, 1023, 1024, 1025, 4099, 65536, 65537, 100_003]
SEEDS = [0, 1, -5, 2**40 + 7]


# ---- the permutation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", AWKWARD_N)
def test_permutation_is_a_bijection(n: int) -> None:
    for seed in SEEDS:
        keys = round_keys(seed, 3)
        image = keyed_permutation(np.arange(n), n, keys)
        assert image.dtype == np.int64 and np.array_equal(np.sort(image), np.arange(n))
        some = range(0, n, max(1, n // 300))  # the per-position path is the same function
        assert [keyed_permutation(i, n, keys) for i in some] == image[list(some)].tolist()


def test_seeds_and_epochs_reshuffle() -> None:
    n = 1000
    orders = {(s, e): EpochOrder(n, s).take(np.arange(e * n, (e + 1) * n)) for s in (0, 1) for e in (0, 1)}
    for a in orders:
        for b in orders:
            if a != b:
                assert (orders[a] == orders[b]).mean() < 0.02  # about 1/n of the positions agree by chance
    assert not np.array_equal(orders[0, 0], np.arange(n))
    tiny = EpochOrder(2, seed=0)  # the two orders of two samples both occur across epochs
    assert {tuple(tiny.take(np.arange(2 * e, 2 * e + 2)).tolist()) for e in range(32)} == {(0, 1), (1, 0)}


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("n", [3, 13])
def test_small_orders_are_uniform_over_seeds(n: int) -> None:
    """Over seeds, where each sample lands and which pair opens the epoch are uniform (chi-square, 5 sd)."""
    seeds = 1200
    where, pairs = np.zeros((n, n)), np.zeros((n, n))
    for s in range(seeds):
        order = EpochOrder(n, s)
        p = [order[g] for g in range(n)]
        where[np.arange(n), p] += 1
        pairs[p[0], p[1]] += 1
    dof = (n - 1) ** 2  # rows and columns of `where` each sum to `seeds`
    assert chi_square(where) < dof + 5 * math.sqrt(2 * dof)
    off = pairs[~np.eye(n, dtype=bool)]
    dof = off.size - 1
    assert chi_square(off) < dof + 5 * math.sqrt(2 * dof)


def test_large_order_looks_random() -> None:
    n = 1_000_003
    order = EpochOrder(n, seed=11).take(np.arange(n))
    r = np.corrcoef(np.arange(n), order)[0, 1]
    assert abs(r) < 5 / math.sqrt(n)
    head = order[:20_000] < n // 2  # a prefix is a draw without replacement: binomial spread about 1/2
    assert abs(head.mean() - 0.5) < 5 * math.sqrt(0.25 / head.size)
    steps = np.abs(np.diff(order[:20_000]))  # consecutive positions land about n/3 apart, not nearby
    assert abs(steps.mean() / n - 1 / 3) < 0.01


def test_constant_memory_at_deepseek_scale() -> None:
    """N = 3.6e9 samples (14.8T tokens at 4K): building the order and drawing 1000 positions of rank 1234 of 2048,
    across an epoch boundary, one by one and vectorised, allocates under 1 MB (a full permutation: 29 GB)."""
    n, rank, dp = 3_600_000_000, 1234, 2048
    first = n // dp - 500  # this rank's positions from here cross into epoch 1
    EpochOrder(10, seed=0).take(np.arange(20))  # what numpy imports on first use is not the order's memory
    tracemalloc.start()
    try:
        start = time.perf_counter()
        order = EpochOrder(n, seed=42)
        one_by_one = [order[(first + i) * dp + rank] for i in range(1000)]
        together = order.take((first + np.arange(1000, dtype=np.int64)) * dp + rank)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and seconds < 5
    assert together.tolist() == one_by_one and 0 <= min(one_by_one) and max(one_by_one) < n
    assert len(set(one_by_one)) == 1000


# ---- verification ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(["a small text to train a small byte-level tokenizer on"] * 10, vocab_size=300).save(path)
    return path


def write_file(prefix: Path, tok_path: Path, n_docs: int = 40, seed: int = 0) -> str:
    tok = Tokenizer.load(tok_path)
    rng = np.random.default_rng(seed)
    writer = TokenFileWriter(prefix, tok.vocab_size, tok.fingerprint)
    for _ in range(n_docs):
        doc = rng.integers(8, 256, size=int(rng.integers(20, 200)))
        writer.add(doc, [len(doc)])
    writer.finish()
    return str(prefix)


def corrupt(prefix: str) -> None:
    path = Path(prefix + ".bin")
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 1
    path.write_bytes(bytes(payload))


def config(tok_path: Path, files: list[str], verify: str) -> DataConfig:
    return DataConfig(datasets=files, tokenizer=str(tok_path), seq_len=16, valid_fraction=0.1, verify=verify)


class FakeRanks(Ranks):
    """A rank of a job without a process group: its role only."""

    def __init__(self, rank: int = 0, local_rank: int = 0, world: int = 1):
        self.distributed, self.rank, self.local_rank, self.world = False, rank, local_rank, world


class Board:
    """What `world` thread-ranks tell each other in `agree`, as the all-reduce and broadcast do."""

    def __init__(self, world: int):
        self.barrier, self.notes = threading.Barrier(world, timeout=30), [(False, None)] * world
        self.rounds = 0


class ThreadRanks(FakeRanks):
    def __init__(self, board: Board, rank: int, local_rank: int):
        super().__init__(rank, local_rank, len(board.notes))
        self.board = board

    def agree(self, pending: bool, error: str | None) -> tuple[bool, str | None]:
        self.board.notes[self.rank] = (pending, error)
        self.board.barrier.wait()
        notes = list(self.board.notes)
        if self.rank == 0:
            self.board.rounds += 1
        self.board.barrier.wait()
        failed = [(r, e) for r, (_, e) in enumerate(notes) if e is not None]
        message = None if not failed else failed[0][1] if failed[0][0] == self.rank else f"{failed[0][1]} (rank)"
        return any(p for p, _ in notes), message


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the threads (or "main") that hashed a token file, one entry per file hashed."""
    calls, original = [], TokenFile.verify_blocks

    def counting(self, *args, **kwargs):
        calls.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TokenFile, "verify_blocks", counting)
    return calls


def run_ranks(configs: list[DataConfig], local_ranks: list[int]) -> tuple[list[object], Board]:
    """build_data on len(configs) thread-ranks; each one's pipeline or exception."""
    board, results = Board(len(configs)), [None] * len(configs)

    def rank(r: int) -> None:
        try:
            results[r] = build_data(configs[r], seed=0, ranks=ThreadRanks(board, r, local_ranks[r]))
        except Exception as err:  # noqa: BLE001 - handed to the test
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, board


@pytest.mark.parametrize("verify, hashing", [("off", []), ("rank0", [0]), ("node", [0, 2]), ("all", [0, 1, 2, 3])])
def test_only_the_chosen_ranks_hash(tok_path: Path, tmp_path: Path, hashed: list[str], verify: str,
                                    hashing: list[int]) -> None:
    files = [write_file(tmp_path / "a", tok_path), write_file(tmp_path / "b", tok_path, seed=1)]
    for rank, local in enumerate([0, 1, 0, 1]):  # two nodes of two ranks, each rank alone
        hashed.clear()
        build_data(config(tok_path, files, verify), seed=0, ranks=FakeRanks(rank, local, world=4))
        assert len(hashed) == (2 if rank in hashing else 0)
    hashed.clear()
    results, _ = run_ranks([config(tok_path, files, verify)] * 4, [0, 1, 0, 1])  # and together
    assert all(isinstance(r, data.dataset.DataPipeline) for r in results)
    assert sorted(hashed) == sorted(f"rank{r}" for r in hashing for _ in files)


def test_a_corrupt_file_stops_every_rank(tok_path: Path, tmp_path: Path, hashed: list[str], monkeypatch) -> None:
    files = [write_file(tmp_path / "good", tok_path), write_file(tmp_path / "bad", tok_path, n_docs=200)]
    corrupt(files[1])
    monkeypatch.setattr(data.dataset, "VERIFY_BLOCK", 1024)  # several blocks: the others wait over many rounds
    results, board = run_ranks([config(tok_path, files, "rank0")] * 4, [0, 1, 2, 3])
    assert sorted(hashed) == ["rank0", "rank0"]
    assert board.rounds > 5
    for r in results:
        assert isinstance(r, DataError)
        assert f"{files[1]}.bin/.idx: checksum mismatch" in str(r) and "hai-data" in str(r)
    with pytest.raises(DataError, match=r"bad.bin/.idx: checksum mismatch.*re-create it with hai-data"):
        build_data(config(tok_path, files, "rank0"), seed=0)  # one process, no group
    build_data(config(tok_path, files, "rank0"), seed=0, ranks=FakeRanks(rank=1))  # rank 1 alone does not hash
    build_data(config(tok_path, files, "off"), seed=0)


def test_blockwise_hash_is_hai_datas_checksum(tok_path: Path, tmp_path: Path) -> None:
    tf = TokenFile(write_file(tmp_path / "a", tok_path), verify=False)
    done = list(tf.verify_blocks(block=777))  # no DataError: the checksum hai-data recorded while writing
    assert done == sorted(done) and done[-1] == tf.n_tokens * tf.dtype.itemsize and len(done) > 3


def test_a_broken_file_on_one_rank_stops_all(tok_path: Path, tmp_path: Path) -> None:
    """Checks every rank makes (here: a missing file, as a node-local copy may be) reach the others too."""
    good = write_file(tmp_path / "good", tok_path)
    cut = write_file(tmp_path / "cut", tok_path)
    Path(cut + ".bin").write_bytes(Path(cut + ".bin").read_bytes()[:-2])
    configs = [config(tok_path, [good], "off")] * 4
    configs[2] = config(tok_path, [cut], "off")
    results, _ = run_ranks(configs, [0, 1, 0, 1])
    for r in results:
        assert isinstance(r, DataError) and f"{cut}.bin: truncated" in str(r) and "hai-data" in str(r)


def test_old_sampler_state_is_refused(tok_path: Path, tmp_path: Path) -> None:
    pipe = build_data(config(tok_path, [write_file(tmp_path / "a", tok_path)], "off"), seed=0)
    pipe.next_batch(2)
    state = json.loads(json.dumps(pipe.state_dict()))
    fresh = build_data(config(tok_path, [str(tmp_path / "a")], "off"), seed=0)
    fresh.load_state_dict(state)
    assert fresh.next_batch(3)[0].tolist() == pipe.next_batch(3)[0].tolist()
    with pytest.raises(DataError, match="version 1 differs.*start a new run"):
        fresh.load_state_dict({**state, "version": 1})
