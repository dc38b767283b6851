"""What torch's flight recorder costs a training step (issue 15: the hang watchdog dumps it, so the trainer switches it
on, TORCH_FR_BUFFER_SIZE=2000, unless the user sized it; on CPUs gloo records every collective with its Python stack).

The main job (`hai-launch --dp 2 experiment=tiny_parallel`: 4 processes, PP=2 DualPipe x DP=2 x EP=2) runs STEPS
steps with the recorder on and off, in interleaved pairs (on, off, then off, on, ...) so that the machine's load hits
both alike; each run's median step time over the steps after the first WARM gives one ratio per pair.

    python -m bench.flight_recorder [--pairs 3 --steps 40]   # writes bench/results/flight_recorder.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WARM = 5
OVERRIDES = ["experiment=tiny_parallel", "trainer.eval_every=0", "trainer.checkpoint_every=0", "logging.plot=false"]


def _median_step(run: Path, buffer: str, steps: int, cache: Path) -> float:
    cmd = [sys.executable, "-m", "launch.launch", "--dp", "2", *OVERRIDES, f"trainer.max_steps={steps}",
           f"trainer.run_dir={run}", f"data.cache_dir={cache}"]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TORCH_FR_BUFFER_SIZE": buffer}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=1200)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["step_time_s"] for r in records if "step_time_s" in r][WARM:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for i in range(args.pairs):
            order = ("2000", "0") if i % 2 == 0 else ("0", "2000")
            times = {b: _median_step(Path(tmp) / f"run{i}_{b}", b, args.steps, cache) for b in order}
            rows.append({"pair": i, "on_s": times["2000"], "off_s": times["0"], "ratio": times["2000"] / times["0"],
                         "load_average": os.getloadavg()[0]})
            print(f"pair {i}: on {times['2000'] * 1e3:.1f} ms, off {times['0'] * 1e3:.1f} ms, "
                  f"on/off {rows[-1]['ratio']:.3f} (load average {rows[-1]['load_average']:.1f})", flush=True)
    ratios = [r["ratio"] for r in rows]
    result = {"steps": args.steps, "pairs": rows, "median_ratio": statistics.median(ratios),
              "mean_ratio": statistics.fmean(ratios)}
    print(f"recorder on / off, median step: median {result['median_ratio']:.3f}, mean {result['mean_ratio']:.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(rows)} pairs")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flight_recorder.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
