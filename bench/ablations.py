"""The paper's ablations at our scale (sections 4.5, 4.5.3; Table 4, Table 5, Figure 10), each a Hydra multirun of
hai-train over the same data and seeds, compared with hai-compare (trainer/compare.py).

The ablations (every point trained with each of `--seeds` seeds, `trainer.seed`: model init and data order):

    mtp      hai-train -m model.n_mtp_depth=0,1 trainer.seed=0,1,2 ...                  Table 4
    balance  hai-train -m model.balance=aux_free,aux_loss,none trainer.seed=0,1,2 ...   Table 5, MaxVio curves
    scope    hai-train -m model.balance=batch_aux trainer.seed=0,1,2 ...                section 4.5.3, compared
             with the aux_free and aux_loss (sequence-wise) points of `balance`
    fp8      hai-train -m fp8=off,emulate optim.moment_dtype=bf16 trainer.seed=0,1,2 ...  Figure 10 (bench/fp8.py's
             setting: bf16 moments on both sides, so the FP8 GEMMs are the only difference)

with the shared settings of `COMMON` (the tiny preset on the embedded corpus, `--steps` steps, validation every
quarter). Each multirun lands in `<runs>/<ablation>/<n>/`; hai-compare --seeds gives one row per point (mean and
spread over the seeds) into `<out>/ablations/<ablation>/compare.{md,json,png}`, and `<out>/ablations.md` (with
`ablations.json`) sets every table
next to the direction the paper reports, with a verdict computed from the numbers: reproduced, not reproduced, or
within the seed spread (a difference no larger than the spread between seeds of one point says nothing).

    python -m bench.ablations                     # everything: bench/results/ablations.md (about 25 min, 2 cores)
    python -m bench.ablations --only mtp --seeds 1 --steps 3 --out /tmp/a --runs /tmp/a/runs   # 2 points, 3 steps

Multiruns run `--jobs` at a time, each process on one thread (the tiny model's GEMMs gain little from a second
thread, two processes use both cores fully).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.compare import compare, render_table, write_outputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = Path(os.environ.get("TMPDIR", "/tmp")) / "hai-ablations"  # the multiruns' run directories (checkpoints)
COMMON = ["trainer.checkpoint_every=0", "trainer.keep_checkpoints=1", "logging.plot=false", "logging.log_every=50",
          "logging.expert_load_every=0"]
SWEEPS = {
    "mtp": ["model.n_mtp_depth=0,1"],
    "balance": ["model.balance=aux_free,aux_loss,none"],
    "scope": ["model.balance=batch_aux"],
    "fp8": ["fp8=off,emulate", "optim.moment_dtype=bf16"],
}
PAPER = {
    "mtp": "Table 4 (15.7B and 228.7B MoE models): MTP improves most benchmarks; inference drops the MTP module, so "
           "the main model is compared. Expected here: lower next-token validation loss with MTP (n_mtp_depth=1).",
    "balance": "Table 5 (15.7B and 228.7B MoE): aux-loss-free balancing beats the purely auxiliary-loss baseline on "
               "most benchmarks; Wang et al. (2024) report MaxVio about 0.04 aux-loss-free vs 0.5-0.7 with an "
               "auxiliary loss. Expected here: aux_free has the lowest MaxVio and a validation loss no worse than "
               "aux_loss; none balances worst.",
    "scope": "Section 4.5.3 (1B MoE): validation loss 2.258 with the sequence-wise auxiliary loss, 2.253 aux-loss-"
             "free, 2.253 batch-wise auxiliary loss: widening the scope from a sequence to the batch is what helps. "
             "Expected here: batch_aux and aux_free at or below aux_loss (sequence-wise).",
    "fp8": "Figure 10 (16B and 230B MoE, about 1T tokens): FP8 training loss within 0.25% (relative) of BF16. "
           "Expected here: |fp8 - off| / off of the training loss below 0.25%.",
}
NOTES = {
    "mtp": "The train loss column is the optimised objective, which with MTP adds lambda x the MTP loss: only the "
           "validation (next-token) loss compares the two.",
}


def multirun(name: str, runs: Path, seeds: int, steps: int, extra: list[str], log: Path) -> subprocess.Popen:
    """Start one ablation's multirun (its sweep x seeds) in a process of its own, on one thread."""
    eval_every = max(1, steps // 4)
    seed_sweep = "trainer.seed=" + ",".join(str(s) for s in range(seeds))
    cmd = [sys.executable, "-m", "trainer.train", "-m", *SWEEPS[name], seed_sweep, f"trainer.max_steps={steps}",
           f"trainer.eval_every={eval_every}", *COMMON, f"hydra.sweep.dir={runs / name}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def points(run_root: Path, balance: set[str]) -> list[Path]:
    """The run directories under `run_root` whose model.balance is in `balance` (from their composed config)."""
    found = []
    for config in sorted(run_root.glob("*/.hydra/config.yaml")):
        if OmegaConf.load(config).model.balance in balance:
            found.append(config.parent.parent)
    return found


def _spread(row: dict[str, Any], key: str) -> float:
    s = (row.get("spread") or {}).get(key)
    return 0.0 if not s else s["max"] - s["min"]


def _row(result: dict[str, Any], key: str, value: Any) -> dict[str, Any] | None:
    return next((r for r in result["rows"] if str(r["overrides"].get(key)) == str(value)), None)


def _paired(a: dict[str, Any], b: dict[str, Any], key: str, relative: bool = False) -> list[float]:
    """a - b of `key` seed by seed (or (a - b) / b): the runs of the two rows with the same trainer.seed share the
    data order and the initial values of every weight both have (model/init.py keys each by its name)."""
    runs_a = {str(m["seed"]): m.get(key) for m in a.get("runs", [a])}
    runs_b = {str(m["seed"]): m.get(key) for m in b.get("runs", [b])}
    out = []
    for seed in sorted(set(runs_a) & set(runs_b)):
        x, y = runs_a[seed], runs_b[seed]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and (y or not relative):
            out.append((x - y) / y if relative else x - y)
    return out


def _lower(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """Is a's `key` below b's: 'yes' when it is for every seed (paired), 'no' when it is above for every seed,
    'mixed' otherwise; with the paired differences and the spread between the seeds of one point."""
    diffs = _paired(a, b, key)
    if not diffs:
        return "no data"
    shown = ", ".join(f"{d:+.4f}" for d in diffs)
    band = max(_spread(a, key), _spread(b, key))
    text = f"{statistics.mean(diffs):+.4f} mean of {len(diffs)} paired seed(s) [{shown}]; seed spread {band:.4f}"
    if len(diffs) < 2:
        return f"{'yes' if diffs[0] < 0 else 'no'} ({text}; one seed: no spread to judge it by)"
    if all(d < 0 for d in diffs):
        return f"yes, for every seed ({text})"
    if all(d > 0 for d in diffs):
        return f"no, above for every seed ({text})"
    return f"mixed across seeds ({text})"


def verdicts(name: str, result: dict[str, Any]) -> list[str]:
    """What the numbers say about the paper's direction for ablation `name`."""
    if name == "mtp":
        on, off = _row(result, "model.n_mtp_depth", 1), _row(result, "model.n_mtp_depth", 0)
        if on and off:
            return [f"validation loss lower with MTP: {_lower(on, off, 'final_val_loss')}"]
    if name in ("balance", "scope"):
        free, seq = _row(result, "model.balance", "aux_free"), _row(result, "model.balance", "aux_loss")
        out = []
        if name == "balance":
            none = _row(result, "model.balance", "none")
            if free and seq and none:
                out += [f"MaxVio aux_free below aux_loss: {_lower(free, seq, 'maxvio_last10')}",
                        f"MaxVio aux_free below none: {_lower(free, none, 'maxvio_last10')}",
                        f"MaxVio aux_loss below none: {_lower(seq, none, 'maxvio_last10')}",
                        f"validation loss aux_free below aux_loss: {_lower(free, seq, 'final_val_loss')}"]
                out.append("MaxVio (last 10% of steps): " + ", ".join(
                    f"{r['overrides'].get('model.balance')} {r['maxvio_last10']:.3f}" for r in result["rows"]
                    if r["maxvio_last10"] is not None))
        else:
            batch = _row(result, "model.balance", "batch_aux")
            if batch and seq:
                out.append(f"validation loss batch_aux below aux_loss (sequence-wise): "
                           f"{_lower(batch, seq, 'final_val_loss')}")
            if free and seq:
                out.append(f"validation loss aux_free below aux_loss: {_lower(free, seq, 'final_val_loss')}")
        return out
    if name == "fp8":
        fp8, off = _row(result, "fp8.recipe", "emulate"), _row(result, "fp8.recipe", "off")
        rel = _paired(fp8, off, "train_loss_last10", relative=True) if fp8 and off else []
        if rel:
            worst = max(abs(r) for r in rel)
            shown = ", ".join(f"{100 * r:+.3f}%" for r in rel)
            return [f"relative training-loss gap (fp8 - off) / off, seed by seed (the same data and initial weights): "
                    f"[{shown}], mean {100 * statistics.mean(rel):+.3f}% (paper: below 0.25%): "
                    f"{'yes' if worst < 0.0025 else 'no'} (largest {100 * worst:.3f}%)"]
    return ["no data"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2, help="multiruns at a time")
    p.add_argument("--out", type=Path, default=RESULTS, help="ablations.md, ablations.json, ablations/<name>/")
    p.add_argument("--runs", type=Path, default=RUNS, help="where the multiruns write their run directories")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. a smaller model)")
    p.add_argument("--report-only", action="store_true", help="compare the runs already under --runs, train none")
    args = p.parse_args(argv)
    if "scope" in args.only and "balance" not in args.only:
        args.only = ["balance", *args.only]  # scope reads balance's aux_free and aux_loss points
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    # the FP8 points (the exact CPU reference GEMMs, about twice as slow) first, so the others fill the other slot
    pending, running, seconds = sorted(args.only, key=lambda n: n != "fp8"), {}, {}
    earlier = {}  # with --report-only, the training invocation's summary: its time and load
    if args.report_only:
        pending = []
        if (args.out / "ablations.json").exists():
            earlier = json.loads((args.out / "ablations.json").read_text())
        seconds = {k: v.get("seconds") for k, v in earlier.get("ablations", {}).items()}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            if (args.runs / name).exists():
                shutil.rmtree(args.runs / name)  # a previous bench's points would join this one's rows
            running[name] = (multirun(name, args.runs, args.seeds, args.steps, args.extra,
                                      args.runs / f"{name}.log"), time.perf_counter())
        time.sleep(1)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            seconds[name] = time.perf_counter() - started
            if proc.returncode:
                raise SystemExit(f"ablation {name} failed (exit {proc.returncode}); see {args.runs / f'{name}.log'}")
    results, sections = {}, []
    for name in args.only:
        runs = args.runs / name
        dirs = [runs] if name != "scope" else [*points(args.runs / "balance", {"aux_free", "aux_loss"}), runs]
        result = compare(dirs, seeds=True)
        write_outputs(result, args.out / "ablations" / name)
        results[name] = {"result": result, "verdicts": verdicts(name, result), "seconds": seconds.get(name)}
        sections += [f"## {name}", "", f"Paper: {PAPER[name]}", "", render_table(result), "",
                     *([NOTES[name], ""] if name in NOTES else []),
                     *(f"- {v}" for v in results[name]["verdicts"]), "",
                     f"![{name}](ablations/{name}/compare.png)", ""]
    total, load = time.perf_counter() - t0, [load_before, os.getloadavg()[0]]
    if args.report_only:
        total, load = earlier.get("minutes", 0.0) * 60, earlier.get("load_average")
    when = f" (load average {load[0]:.2f} before, {load[1]:.2f} after)" if load else ""
    header = [
        "# The paper's ablations at our scale (`python -m bench.ablations`)", "",
        f"Tiny preset on the embedded corpus, {args.steps} steps, {args.seeds} seeds per point (trainer.seed: init "
        f"and data order), same data; {args.jobs} multiruns at a time on one thread each; {total / 60:.1f} min in "
        f"all{when}. Rows: hai-compare --seeds (mean ± std over the seeds). A "
        "verdict pairs the runs of one seed (the same data order and initial weights), so seed-to-seed noise cancels: "
        "'yes' when the direction holds for every seed, 'mixed' when the seeds disagree; with 3 seeds, 'yes' by "
        "chance alone has probability 1/8. Extra overrides: "
        f"{' '.join(args.extra) or 'none'}.", ""]
    (args.out / "ablations.md").write_text("\n".join(header + sections))
    summary = {"steps": args.steps, "seeds": args.seeds, "minutes": total / 60, "load_average": load,
               "extra": args.extra,
               "ablations": {k: {"verdicts": v["verdicts"], "seconds": v["seconds"], "rows": v["result"]["rows"]}
                             for k, v in results.items()}}
    (args.out / "ablations.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n".join(header + sections))
    return summary


if __name__ == "__main__":
    main()
