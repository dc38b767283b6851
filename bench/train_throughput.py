"""Is the data pipeline fast enough? Preprocessing, data loading and the model's training step, side by side.

What it measures, in interleaved rounds so that machine noise hits every variant alike (medians reported):

- preprocess: hai-data's `encode_documents` on the same ~4 MB of default-corpus text (standard library source,
              python3-doc where installed) with 1 and 2 worker processes, in tokens/s (pool start included, as a
              user sees it);
- loader:     `DataPipeline.next_batch(8)` at seq_len 256 on the default corpus (packing + FIM 0.1), batches/s
              and tokens/s;
- model:      one training step of the `tiny` preset on those batches: `model.loss(tokens, labels,
              mtp_lambda=0.3).loss.backward()` + AdamW, tokens/s;
- loader / model: how many times faster the loader is than the model consumes (>> 1: never the bottleneck).

The default corpus and its tokenizer come from the cache (data.corpus, prepared on first use). Nothing is
asserted; speed is never part of the test suite.

    python -m bench.train_throughput [--rounds 3 --text-mb 4 --loader-batches 50 --steps 4]
    # writes bench/results/train_throughput.json
"""

# Only the standard library is imported at module level: the spawned hai-data workers re-import this module
# (it is __main__), and importing torch there would be counted as preprocessing time.
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
BATCH, SEQ = 8, 256


def corpus_text(n_bytes: int) -> list[tuple[str, int]]:
    from data.corpus import read_corpus_file, select_corpus

    return [(read_corpus_file(path, take), take) for path, take in select_corpus(n_bytes)]


def time_preprocess(docs: list[tuple[str, int]], tokenizer, workers: int, folder: Path) -> float:
    from data.preprocess import encode_documents

    stats = encode_documents(docs, tokenizer, folder / f"w{workers}", workers=workers, progress=False)
    return stats.tokens_per_s


def time_loader(pipe, n_batches: int) -> float:
    start = time.perf_counter()
    for _ in range(n_batches):
        pipe.next_batch(BATCH)
    return n_batches / (time.perf_counter() - start)


def make_model_step(pipe):
    import torch

    from data.dataset import check_vocab
    from model import Transformer, presets

    torch.manual_seed(0)
    cfg = presets.load("tiny")
    check_vocab(pipe.vocab_size, cfg.vocab_size)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [pipe.next_batch(BATCH) for _ in range(4)]

    def step(i: int) -> float:
        tokens, labels = batches[i % len(batches)]
        start = time.perf_counter()
        model.loss(tokens, labels, mtp_lambda=0.3).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text-mb", type=float, default=4.0, help="default-corpus text to preprocess")
    parser.add_argument("--loader-batches", type=int, default=50, help="next_batch calls per round")
    parser.add_argument("--steps", type=int, default=4, help="model steps per round (after 2 warm-up steps)")
    args = parser.parse_args(argv)

    from data.config import DataConfig
    from data.dataset import build_data

    load_before = os.getloadavg()
    pipe = build_data(DataConfig(seq_len=SEQ), seed=0)
    docs = corpus_text(int(args.text_mb * 1e6))
    step = make_model_step(pipe)
    for i in range(2):  # warm-up
        step(i)
    rates: dict[str, list[float]] = {"preprocess_1": [], "preprocess_2": [], "loader": [], "model": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                rates[f"preprocess_{workers}"].append(time_preprocess(docs, pipe.tokenizer, workers, Path(tmp)))
            rates["loader"].append(time_loader(pipe, args.loader_batches))
            rates["model"] += [BATCH * SEQ / step(r * args.steps + i) for i in range(args.steps)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    loader_tokens = med["loader"] * BATCH * SEQ
    text_bytes = sum(n for _, n in docs)
    rows = [("preprocess, 1 worker", f"{med['preprocess_1']:,.0f} tokens/s"),
            ("preprocess, 2 workers", f"{med['preprocess_2']:,.0f} tokens/s "
                                      f"({med['preprocess_2'] / med['preprocess_1']:.2f}x)"),
            (f"data loader next_batch ({BATCH} x {SEQ})",
             f"{med['loader']:,.1f} batches/s = {loader_tokens:,.0f} tokens/s"),
            (f"model step, tiny ({BATCH} x {SEQ}, MTP, AdamW)", f"{med['model']:,.0f} tokens/s"),
            ("loader / model", f"{loader_tokens / med['model']:,.0f}x")]
    print(f"text: {text_bytes / 1e6:.1f} MB, {len(docs)} documents; tokenizer vocab {pipe.vocab_size}; "
          f"{args.rounds} rounds, medians; load average {load_before[0]:.2f}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    result = {"batch": BATCH, "seq": SEQ, "text_bytes": text_bytes, "documents": len(docs),
              "vocab_size": pipe.vocab_size, "rounds": args.rounds, "medians": med, "samples": rates,
              "loader_tokens_per_s": loader_tokens, "loader_over_model": loader_tokens / med["model"],
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
