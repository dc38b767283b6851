"""Speed of this checkout against another one (a refactor must not slow anything down), measured side by side.

Three measurements, each run in both checkouts in ABBA order per round (before, after, after, before), so that
machine noise and drift hit both alike; the report is the ratio after / before of the medians over all runs:

- `bench.model_step`: the median training step of our model (the first variant it times);
- `bench.pipeline_torch`: our executor's step on PP=2 with 1F1B and DualPipeV (its two processes);
- the training loop: `python -m trainer.train` on the tiny preset in one process, the median `step_time_s` of
  metrics.jsonl after the first steps (what `hai-train` costs per step, loop and optimizer included).

    python -m bench.ab --before /path/to/old/checkout [--rounds 1]   # writes bench/results/ab.json

The other checkout runs with this interpreter and its own sources first on the path (PYTHONPATH), so it needs no
environment of its own, only the same dependencies.
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

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "bench" / "results" / "ab.json"
LOOP = ["model=tiny", "trainer.max_steps=30", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "logging.plot=false", "logging.log_every=100"]
SKIP = 5  # steps of the loop measurement left out (warm-up)


def _python(tree: Path, args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise RuntimeError(f"{tree}: {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def model_step(tree: Path, tmp: Path) -> dict[str, float]:
    out = tmp / "model_step.json"
    _python(tree, ["-m", "bench.model_step", "--profile-iters", "0", "--out", str(out)], tree)
    variants = json.loads(out.read_text())["variants"]
    name = next(iter(variants))
    return {f"model_step {name} (s)": variants[name]["median_s"]}


def pipeline_torch(tree: Path, tmp: Path) -> dict[str, float]:
    _python(tree, ["-m", "bench.pipeline_torch"], tree)
    rows = json.loads((tree / "bench" / "results" / "pipeline_torch.json").read_text())
    return {f"pipeline_torch ours {r['schedule']} (s)": r["step_s"] for r in rows if r["executor"] == "ours"}


def train_loop(tree: Path, tmp: Path) -> dict[str, float]:
    run = tmp / "loop"
    _python(tree, ["-m", "trainer.train", *LOOP, f"trainer.run_dir={run}"], tmp)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if r.get("split") == "train"][SKIP:]
    return {"hai-train step, tiny, 1 process (s)": statistics.median(times)}


MEASUREMENTS = (model_step, pipeline_torch, train_loop)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="the other checkout (e.g. a git worktree of main)")
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds (each runs every measurement 4 times)")
    p.add_argument("--only", choices=[m.__name__ for m in MEASUREMENTS], nargs="+", help="some measurements only")
    args = p.parse_args(argv)
    measurements = [m for m in MEASUREMENTS if args.only is None or m.__name__ in args.only]
    trees = {"before": args.before.resolve(), "after": HERE}
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for _ in range(args.rounds):
        for measure in measurements:
            for side in ("before", "after", "after", "before"):
                with tempfile.TemporaryDirectory() as tmp:
                    for key, value in measure(trees[side], Path(tmp)).items():
                        samples[side].setdefault(key, []).append(value)
                        print(f"{side:6} {key}: {value:.4f}", flush=True)
    rows = []
    for key in samples["after"]:
        before, after = statistics.median(samples["before"][key]), statistics.median(samples["after"][key])
        rows.append({"what": key, "before": before, "after": after, "after_over_before": after / before,
                     "samples": {"before": samples["before"][key], "after": samples["after"][key]}})
    print(f"\n{'what':48} {'before':>9} {'after':>9} {'after/before':>13}")
    for r in rows:
        print(f"{r['what']:48} {r['before']:>9.4f} {r['after']:>9.4f} {r['after_over_before']:>13.3f}")
    result = {"before": str(trees["before"]), "after": str(HERE), "rounds": args.rounds, "rows": rows,
              "load_average": list(os.getloadavg())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = RESULTS if args.only is None else RESULTS.with_name(f"ab_{'_'.join(args.only)}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
