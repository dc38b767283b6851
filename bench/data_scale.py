"""Data at DeepSeek-V3's scale: the sample order's memory and speed, and the start-up cost of the checksum check.

What it measures (data/dataset.py's module docstring has the design):

- order memory: for N = 3.6e9 samples per epoch (14.8T tokens at 4K), the bytes the former full int64 permutation
                held per rank (N x 8, computed: it is not allocated), against what tracemalloc sees while the
                Feistel `EpochOrder` is built and 1000 positions of rank 1234 of 2048 are drawn, one by one and
                vectorised; and the peak of one vectorised draw of 1M positions (O(batch), not O(N));
- order speed:  seconds per million positions drawn one at a time (`order[g]`, what `sample(g)` costs) and
                vectorised (`order.take(g)`, what `next_batch` uses) in batches of 4096 and of 1M;
- start-up:     `build_data` for one rank on a generated token file of --mb MB (in a temporary folder under /tmp,
                deleted at the end) with data.verify = off (every rank now), and as the hashing rank under
                rank0 (what every rank paid before); the file was just written, so it sits in the page cache and
                the hash is CPU-bound; the hash rate is extrapolated to DeepSeek-V3's 14.8T tokens (uint32 ids).

Nothing is asserted; tests/unit/test_data_scale.py checks the properties.

    python -m bench.data_scale [--mb 300 --rounds 3]   # prints a table, writes bench/results/data_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from data.config import DataConfig
from data.dataset import EpochOrder, Ranks, build_data
from data.preprocess import TokenFileWriter
from data.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "data_scale.json"
N, RANK, DP = 3_600_000_000, 1234, 2048  # samples per epoch of DeepSeek-V3's 14.8T tokens at 4K; one rank of 2048
V3_TOKENS, V3_ID_BYTES = 14.8e12, 4  # its vocabulary of 129280 needs uint32 token ids
VERIFY = ("off", "rank0")


def order_memory() -> dict:
    positions = (N // DP - 500 + np.arange(1000, dtype=np.int64)) * DP + RANK  # crosses into epoch 1
    EpochOrder(10, seed=0).take(np.arange(20))  # what numpy imports on first use is not the order's memory
    tracemalloc.start()
    order = EpochOrder(N, seed=42)
    for g in positions.tolist():
        order[g]
    order.take(positions)
    _, small = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    order.take(np.arange(1_000_000, dtype=np.int64) * DP + RANK)
    _, batch = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"samples_per_epoch": N, "full_permutation_bytes": N * 8, "order_and_1000_draws_peak_bytes": small,
            "vectorised_1M_draw_peak_bytes": batch}


def order_speed(rounds: int) -> dict:
    order = EpochOrder(N, seed=42)
    g = np.arange(1_000_000, dtype=np.int64) * DP + RANK
    one, small, big = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for x in g[:100_000].tolist():
            order[x]
        one.append((time.perf_counter() - start) * 10)
        start = time.perf_counter()
        for i in range(0, len(g), 4096):
            order.take(g[i:i + 4096])
        small.append(time.perf_counter() - start)
        start = time.perf_counter()
        order.take(g)
        big.append(time.perf_counter() - start)
    return {"one_by_one_s_per_million": statistics.median(one),
            "vectorised_4096_s_per_million": statistics.median(small),
            "vectorised_1M_s_per_million": statistics.median(big)}


class _Rank(Ranks):
    """A rank's role without a process group (the agreement is one small all-reduce per block at scale)."""

    def __init__(self, rank: int):
        self.distributed, self.rank, self.local_rank, self.world = False, rank, rank, 1


def write_token_file(folder: Path, mb: int) -> tuple[Path, str]:
    tok_path = folder / "tokenizer.json"
    Tokenizer.train(["a small text to train a small byte-level tokenizer on"] * 10, vocab_size=300).save(tok_path)
    tok, rng = Tokenizer.load(tok_path), np.random.default_rng(0)
    writer = TokenFileWriter(folder / "tokens", tok.vocab_size, tok.fingerprint)
    chunk = 8_000_000  # tokens per add: bounded memory whatever --mb says
    for _ in range(max(1, mb * 500_000 // chunk)):
        cuts = np.unique(rng.integers(1, chunk, size=chunk // 2000))  # documents of about 2000 tokens
        writer.add(rng.integers(8, 256, size=chunk, dtype=np.uint16), np.diff(np.concatenate([[0], cuts, [chunk]])))
    writer.finish()
    return tok_path, str(folder / "tokens")


def startup(mb: int, rounds: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="hai-data-scale-", dir="/tmp"))
    try:
        tok_path, prefix = write_token_file(folder, mb)
        size = Path(prefix + ".bin").stat().st_size + Path(prefix + ".idx").stat().st_size
        cfg = {v: DataConfig(datasets=[prefix], tokenizer=str(tok_path), seq_len=4096, verify=v) for v in VERIFY}
        times: dict[str, list[float]] = {"off": [], "rank0_hashing_rank": [], "rank0_other_rank": []}
        for _ in range(rounds):
            for name, verify, rank in (("off", "off", 0), ("rank0_hashing_rank", "rank0", 0),
                                       ("rank0_other_rank", "rank0", 1)):
                start = time.perf_counter()
                build_data(cfg[verify], seed=0, ranks=_Rank(rank))
                times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(folder)
    medians = {f"build_s_{k}": statistics.median(v) for k, v in times.items()}
    hash_s = medians["build_s_rank0_hashing_rank"] - medians["build_s_off"]
    rate = size / max(hash_s, 1e-9)
    v3_bytes = V3_TOKENS * V3_ID_BYTES
    return {"token_file_bytes": size, **medians, "hash_bytes_per_s": rate, "deepseek_v3_data_bytes": v3_bytes,
            "deepseek_v3_hash_hours": v3_bytes / rate / 3600}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the generated token file (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, median reported (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = {"order_memory": order_memory(), "order_speed": order_speed(args.rounds),
              "startup": startup(args.mb, args.rounds)}
    mem, speed, start = result["order_memory"], result["order_speed"], result["startup"]
    print(f"sample order for N = {N:.2e} samples, rank {RANK} of {DP}:")
    print(f"  full int64 permutation (before):      {mem['full_permutation_bytes'] / 1e9:8.1f} GB per rank")
    print(f"  EpochOrder + 1000 draws (tracemalloc): {mem['order_and_1000_draws_peak_bytes']:8d} bytes")
    print(f"  one vectorised draw of 1M positions:   {mem['vectorised_1M_draw_peak_bytes'] / 1e6:8.1f} MB (O(batch))")
    print(f"  s per million positions: one by one {speed['one_by_one_s_per_million']:.2f}, vectorised by 4096 "
          f"{speed['vectorised_4096_s_per_million']:.3f}, by 1M {speed['vectorised_1M_s_per_million']:.3f}")
    print(f"start-up, build_data on a {start['token_file_bytes'] / 1e6:.0f} MB token file (page cache):")
    print(f"  data.verify=off:                  {start['build_s_off']:7.3f} s")
    print(f"  data.verify=rank0, rank 0 hashes: {start['build_s_rank0_hashing_rank']:7.3f} s "
          f"({start['hash_bytes_per_s'] / 1e9:.2f} GB/s)")
    print(f"  data.verify=rank0, another rank:  {start['build_s_rank0_other_rank']:7.3f} s")
    print(f"  hashing DeepSeek-V3's {start['deepseek_v3_data_bytes'] / 1e12:.0f} TB of token ids at that rate: "
          f"{start['deepseek_v3_hash_hours']:.1f} h")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
