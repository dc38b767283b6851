"""`hai-compare`: several runs in one table (an ablation's points, a sweep, seeds), each difference read against the
baseline and, with --seeds, against the noise between seeds.

    hai-compare multirun/tiny/2026-12-01_21-33-22           # every point of a multirun
    hai-compare runs/a runs/b --baseline 1 --out cmp         # two runs, the second one the baseline
    hai-compare multirun/tiny/<time> --seeds                 # runs that differ only in trainer.seed: one row

A directory given is a run (it holds metrics.jsonl) or holds runs anywhere below it (a multirun's points, in
natural order). A row says what differs between the runs (their composed configs, `.hydra/config.yaml`, flattened
to dotted keys and diffed; the command lines, `.hydra/overrides.yaml`, when a run lacks its config.yaml), the step
and tokens of the last training record, the last and the best validation loss, and over the last 10% of the
training records (at least one) the mean training loss (`loss`: the optimised one, with the MTP and balance terms;
compare.json also has the next-token `lm_loss`), MaxVio and tokens/s; then the differences to the baseline row in
validation and training loss. With --seeds the runs that differ only in trainer.seed make one row: the mean over its
seeds, each metric's min, max and std, and whether the difference to the baseline exceeds the seed spread (the
larger max - min of the two rows).

Runs of different model sizes (`MODEL_SHAPE_KEYS`) or data (`DATA_KEYS`) do not compare and are refused unless
--force. Broken lines of a metrics.jsonl (a torn last line of a run still writing) are skipped and counted. Writes
compare.md (the table), compare.json (`{"rows": [...]}`) and compare.png (loss and MaxVio curves, one colour per
row) into --out. `compare` and `write_outputs` are the same as functions, for benchmark scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.config import ArgumentParser, ConfigError
from trainer.metrics import METRICS_FILE

TAIL_FRACTION = 0.1  # the share of the training records the training metrics are averaged over
# the main model's fields that change a tensor's shape: runs that differ in one of them are different models, not an
# ablation of one (balance, routing, YaRN, max_seq_len and recompute settings change no tensor; trainer/init_from.py).
# model.n_mtp_depth is not among them: the MTP modules are dropped for inference and are what paper Table 4 ablates
# on the same main model
MODEL_SHAPE_KEYS = tuple(f"model.{k}" for k in (
    "vocab_size", "dim", "n_layers", "first_k_dense", "inter_dim", "n_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "moe_inter_dim"))
# what the model reads and is validated on (data/config.py); FIM and the token-boundary split are left out: they are
# what a data ablation varies
DATA_KEYS = tuple(f"data.{k}" for k in (
    "datasets", "weights", "tokenizer", "vocab_size", "seq_len", "corpus_bytes", "valid_fraction"))
IGNORED_KEYS = ("trainer.run_dir", "data.cache_dir")  # where a run writes and caches, not what it does
SEED_KEY = "trainer.seed"
METRIC_KEYS = ("steps", "tokens", "final_val_loss", "best_val_loss", "train_loss_last10", "lm_loss_last10",
               "maxvio_last10", "tokens_per_s")
BASELINE_KEYS = ("final_val_loss", "train_loss_last10")  # the metrics whose difference to the baseline is given
MD_FILE, JSON_FILE, PLOT_FILE = "compare.md", "compare.json", "compare.png"
_ABSENT = object()


@dataclass
class Run:
    """One run directory, read."""

    path: Path  # as given, or the multirun directory given / the point's relative path
    config: dict[str, Any] | None  # .hydra/config.yaml flattened to dotted keys; None without the file
    overrides: dict[str, Any]  # .hydra/overrides.yaml as key -> value (strings as typed); {} without the file
    train: list[dict[str, Any]]  # training records in file order
    valid: list[dict[str, Any]]  # validation records in file order
    skipped_lines: int  # lines of metrics.jsonl that are not a JSON record with a step


def find_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """The run directories in `dirs`: each one that holds metrics.jsonl, else every directory below it that does
    (naturally sorted: point 10 after point 9); the same run given twice counts once."""
    runs: list[Path] = []
    seen: set[Path] = set()
    for given in map(Path, dirs):
        if not given.is_dir():
            raise ConfigError(f"{given}: no such directory; give run directories of hai-train (each holds "
                              f"{METRICS_FILE}) or directories holding them, such as a multirun's")
        if (given / METRICS_FILE).is_file():
            found = [given]
        else:
            found = sorted((p.parent for p in given.rglob(METRICS_FILE) if p.is_file()),
                           key=lambda p: _natural(p.relative_to(given)))
        if not found:
            raise ConfigError(f"{given}: holds no run: no {METRICS_FILE} in it or in any directory below it; give "
                              "run directories of hai-train or a multirun directory (multirun/<experiment>/<time>)")
        for run in found:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                runs.append(run)
    return runs


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def read_metrics(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(training records, validation records, broken lines skipped) of `run`'s metrics.jsonl; a ConfigError names
    the run when the file cannot be read or holds no training record."""
    path = run / METRICS_FILE
    try:
        text = path.read_text(errors="replace")  # a corrupt byte costs its line, not the run
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err}); leave the run out or fix the "
                          "file") from None
    train: list[dict[str, Any]] = []
    valid: list[dict[str, Any]] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            skipped += 1
            continue
        (valid if record.get("split") == "valid" else train).append(record)
    if not train:
        content = "it is empty" if not text.strip() else \
            f"none of its {len(text.splitlines())} line(s) is a training record ({skipped} unreadable)"
        raise ConfigError(f"{path}: no training record, {content}; a run is compared by its training records, "
                          "so leave this run out (or wait for its first step)")
    return train, valid, skipped


def load_run(path: Path) -> Run:
    """A run's config, overrides and metrics; a ConfigError names the run and the file at fault."""
    hydra = path / ".hydra"
    config, overrides = None, {}
    for name in ("config.yaml", "overrides.yaml"):
        if not (hydra / name).is_file():
            continue
        try:
            tree = OmegaConf.to_container(OmegaConf.load(hydra / name), resolve=False)
        except Exception as err:  # OSError, YAML syntax: one message whatever the cause
            raise ConfigError(f"{hydra / name}: not readable YAML ({' '.join(str(err).split())}); fix or remove "
                              "the file") from None
        if name == "config.yaml":
            config = _flatten(tree) if isinstance(tree, dict) else {}
        elif isinstance(tree, list):
            overrides = dict(_split_override(str(line)) for line in tree)
    train, valid, skipped = read_metrics(path)
    return Run(path, config, overrides, train, valid, skipped)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _split_override(line: str) -> tuple[str, str]:
    key, _, value = line.partition("=")
    return key.lstrip("+~"), value


def summarize(run: Run) -> dict[str, Any]:
    """The metrics of one run (see the module docstring)."""
    last = run.train[-1]
    tail = run.train[-max(1, math.ceil(TAIL_FRACTION * len(run.train))):]
    val = [r.get("val_loss") for r in run.valid if "val_loss" in r]
    finite = [v for v in val if _number(v)]
    return {"steps": last["step"], "tokens": last.get("tokens"),
            "final_val_loss": val[-1] if val and _number(val[-1]) else None,
            "best_val_loss": min(finite) if finite else None,
            "train_loss_last10": _mean(r.get("loss") for r in tail),
            "lm_loss_last10": _mean(r.get("lm_loss") for r in tail),
            "maxvio_last10": _mean(r.get("maxvio") for r in tail),
            "tokens_per_s": _mean(r.get("tokens_per_s") for r in tail)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values) -> float | None:
    numbers = [v for v in values if _number(v)]
    return statistics.fmean(numbers) if numbers else None


def compare(dirs: Sequence[str | Path], baseline: int = 0, seeds: bool = False, force: bool = False) -> dict[str, Any]:
    """The comparison of the runs in `dirs` (run or multirun directories), as written to compare.json: {"rows",
    "baseline", "seeds", "config_source", "notes"}; a ConfigError for anything that stops it (see main)."""
    runs = [load_run(p) for p in find_runs(dirs)]
    notes = [f"{r.path}: {r.skipped_lines} broken line(s) of {METRICS_FILE} skipped" for r in runs if r.skipped_lines]
    source = "config.yaml" if all(r.config is not None for r in runs) else "overrides.yaml"
    if source == "overrides.yaml":  # one source for every run, or every key of a config would look like a difference
        notes.append("some runs have no .hydra/config.yaml (" + ", ".join(str(r.path) for r in runs if r.config is None)
                     + "): their command lines (.hydra/overrides.yaml) are compared instead")
    configs = [{k: v for k, v in (r.config if source == "config.yaml" else r.overrides).items()
                if k not in IGNORED_KEYS and not k.startswith("hydra.")} for r in runs]
    conflicts = _conflicts(runs, configs)
    if conflicts and not force:
        raise ConfigError("these runs are of different model sizes or data, so their losses do not compare: "
                          + "; ".join(conflicts) + ". Compare runs of one model and data, or pass --force")
    if conflicts:
        notes.append("compared despite different model sizes or data (--force): " + "; ".join(conflicts))
    groups = _seed_groups(configs) if seeds else [[i] for i in range(len(runs))]
    if not 0 <= baseline < len(groups):
        raise ConfigError(f"--baseline {baseline}: there are {len(groups)} row(s), so it takes 0 to "
                          f"{len(groups) - 1} (the row's index in the table)")
    shown = [{k: v for k, v in configs[g[0]].items() if not seeds or k != SEED_KEY} for g in groups]
    differing = _differing(shown)
    summaries = [summarize(r) for r in runs]
    rows = []
    for group, config in zip(groups, shown):
        overrides = {k: config.get(k) for k in differing}
        if not seeds:
            i = group[0]
            rows.append({"run": str(runs[i].path), "overrides": overrides, **summaries[i],
                         "skipped_lines": runs[i].skipped_lines})
            continue
        members = [{"run": str(runs[i].path), "seed": configs[i].get(SEED_KEY), **summaries[i],
                    "skipped_lines": runs[i].skipped_lines} for i in group]
        row: dict[str, Any] = {"run": ", ".join(m["run"] for m in members), "overrides": overrides,
                               "n_seeds": len(members), "seeds": [m["seed"] for m in members]}
        spread = {}
        for key in METRIC_KEYS:
            values = [m[key] for m in members if _number(m[key])]
            row[key] = statistics.mean(values) if values else None
            spread[key] = {"min": min(values), "max": max(values),
                           "std": statistics.stdev(values) if len(values) > 1 else None} if values else None
        rows.append({**row, "spread": spread, "runs": members})
    _baseline_deltas(rows, baseline, seeds)
    return {"rows": rows, "baseline": baseline, "seeds": seeds, "config_source": source, "notes": notes}


def _conflicts(runs: list[Run], configs: list[dict[str, Any]]) -> list[str]:
    """`key: value (runs) vs value (runs)` for every model-shape or data key on which the runs disagree."""
    out = []
    for key in MODEL_SHAPE_KEYS + DATA_KEYS:
        by_value: dict[str, list[str]] = {}
        for run, config in zip(runs, configs):
            value = config.get(key, _ABSENT)
            if value is not _ABSENT:
                by_value.setdefault(json.dumps(value), []).append(str(run.path))
        if len(by_value) > 1:
            out.append(f"{key}: " + " vs ".join(f"{_text(json.loads(v))} ({', '.join(names)})"
                                                for v, names in by_value.items()))
    return out


def _seed_groups(configs: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the runs whose configs are equal but for trainer.seed, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        key = json.dumps({k: v for k, v in config.items() if k != SEED_KEY}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    """The keys, in config order, whose value is not the same in every config (absent counts as a value)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if any(c.get(k, _ABSENT) != configs[0].get(k, _ABSENT) for c in configs[1:])]


def _baseline_deltas(rows: list[dict[str, Any]], baseline: int, seeds: bool) -> None:
    """delta_<key> = row - baseline row; with seeds also spread_<key>, the larger max - min over the seeds of the
    row and of the baseline (None with one seed in both), and exceeds_spread_<key> = |delta| > spread."""
    base = rows[baseline]
    for i, row in enumerate(rows):
        for key in BASELINE_KEYS:
            both = row[key] is not None and base[key] is not None
            delta = row[key] - base[key] if both else None
            row[f"delta_{key}"] = delta
            if not seeds:
                continue
            ranges = [r["spread"][key]["max"] - r["spread"][key]["min"] for r in (row, base)
                      if r["spread"][key] is not None]
            spread = max(ranges) if ranges and max(row["n_seeds"], base["n_seeds"]) > 1 else None
            row[f"spread_{key}"] = spread
            row[f"exceeds_spread_{key}"] = abs(delta) > spread \
                if i != baseline and delta is not None and spread is not None else None


# ---- output -------------------------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    """A config value as an override writes it (`false`, `null`, `[a, b]`)."""
    return json.dumps(value) if value is None or isinstance(value, (bool, list, dict)) else str(value)


def _labels(rows: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """(the directory every run lies under, or None; each row's runs relative to it)."""
    paths = [m["run"] for row in rows for m in row.get("runs", [row])]
    common = os.path.commonpath(paths) if len(paths) > 1 and len({os.path.isabs(p) for p in paths}) == 1 else ""
    if not common or common in paths:
        common = ""

    def short(path: str) -> str:
        return os.path.relpath(path, common) if common else path
    return common or None, [", ".join(short(m["run"]) for m in row.get("runs", [row])) for row in rows]


def _num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _band(row: dict[str, Any], key: str, spec: str = ".4f") -> str:
    std = row["spread"][key]["std"] if "spread" in row and row["spread"][key] else None
    return _num(row[key], spec) + (f" ± {format(std, spec)}" if std is not None else "")


def _delta(row: dict[str, Any], key: str, is_baseline: bool) -> str:
    if is_baseline:
        return "baseline"
    text = _num(row[f"delta_{key}"], "+.4f")
    exceeds = row.get(f"exceeds_spread_{key}")
    if exceeds is not None:
        text += f" ({'>' if exceeds else 'within'} spread {row[f'spread_{key}']:.4f})"
    return text


def render_table(result: dict[str, Any]) -> str:
    """The table as markdown, columns padded so that it also reads as plain text."""
    rows, seeds = result["rows"], result["seeds"]
    _, labels = _labels(rows)
    head = ["#", "run", "overrides"] + (["seeds"] if seeds else []) + [
        "steps", "tokens", "val loss", "best val", "train loss", "maxvio", "tok/s", "Δ val loss", "Δ train loss"]
    body = []
    for i, (row, label) in enumerate(zip(rows, labels)):
        overrides = ", ".join(f"{k}={_text(v)}" for k, v in row["overrides"].items()) or "-"
        body.append([str(i), label, overrides] + ([str(row["n_seeds"])] if seeds else []) + [
            _num(row["steps"], ",.0f"), _num(row["tokens"], ",.0f"), _band(row, "final_val_loss"),
            _band(row, "best_val_loss"), _band(row, "train_loss_last10"), _band(row, "maxvio_last10"),
            _band(row, "tokens_per_s", ",.0f"), _delta(row, "final_val_loss", i == result["baseline"]),
            _delta(row, "train_loss_last10", i == result["baseline"])])
    widths = [max(len(r[c]) for r in [head] + body) for c in range(len(head))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in [head] + body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _caption(result: dict[str, Any]) -> str:
    common, _ = _labels(result["rows"])
    where = f"runs under `{common}`; " if common else ""
    seeds = "; each row the mean ± std over its seeds" if result["seeds"] else ""
    return (f"{where}baseline: row {result['baseline']}; train loss (`loss`), maxvio and tok/s: means over the last "
            f"{TAIL_FRACTION:.0%} of the training records{seeds}; overrides from .hydra/{result['config_source']}")


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    """compare.md, compare.json and compare.png of `result` (from `compare`) into `out`; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# hai-compare\n\n{_caption(result)}\n\n{render_table(result)}\n"
    if result["notes"]:
        md += "\n" + "".join(f"- {note}\n" for note in result["notes"])
    (out / MD_FILE).write_text(md)
    (out / JSON_FILE).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    plot(result, out / PLOT_FILE)
    return [out / MD_FILE, out / JSON_FILE, out / PLOT_FILE]


def plot(result: dict[str, Any], out: Path) -> Path:
    """compare.png: training next-token loss (lines; `lm_loss`, comparable with the validation loss, as loss.png)
    and validation loss (dots) per step, and MaxVio per step; one colour per row, every seed of a row drawn in it."""
    from matplotlib.figure import Figure  # no pyplot, as trainer/metrics.py

    fig = Figure(figsize=(12, 4.5), dpi=110)
    ax_loss, ax_vio = fig.subplots(1, 2)
    for i, row in enumerate(result["rows"]):
        color = f"C{i % 10}"
        overrides = ", ".join(f"{k}={_text(v)}" for k, v in row["overrides"].items())
        for j, member in enumerate(row.get("runs", [row])):
            train, valid, _ = read_metrics(Path(member["run"]))
            label = f"{i}: {_clip(overrides or member['run'])}" if j == 0 else None
            key = "lm_loss" if any(_number(r.get("lm_loss")) for r in train) else "loss"
            points = [(r["step"], r[key]) for r in train if _number(r.get(key))]
            if points:
                ax_loss.plot(*zip(*points), "-", color=color, linewidth=1, alpha=0.8, label=label)
            points = [(r["step"], r["val_loss"]) for r in valid if _number(r.get("val_loss"))]
            if points:
                ax_loss.plot(*zip(*points), "o--", color=color, markersize=4, linewidth=0.8)
            points = [(r["step"], r["maxvio"]) for r in train if _number(r.get("maxvio"))]
            if points:
                ax_vio.plot(*zip(*points), "-", color=color, linewidth=1, alpha=0.8)
    ax_loss.set_title("loss (lines: training next-token loss, dots: validation)", fontsize=9)
    ax_vio.set_title("MaxVio of the expert loads", fontsize=9)
    for ax, name in ((ax_loss, "loss"), (ax_vio, "maxvio")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    return out


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- command line -------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="hai-compare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_MULTIRUN_DIR",
                   help="run directories, or directories holding runs (a multirun's: every point)")
    p.add_argument("--baseline", type=int, default=0, help="the row the others are compared with (default 0)")
    p.add_argument("--seeds", action="store_true",
                   help="one row per group of runs that differ only in trainer.seed: means and seed spreads")
    p.add_argument("--force", action="store_true", help="compare runs of different model sizes or data")
    p.add_argument("--out", default="compare", help="where compare.md, .json and .png go (default ./compare)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        result = compare(args.dirs, baseline=args.baseline, seeds=args.seeds, force=args.force)
    except ConfigError as err:
        print("hai-compare: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"hai-compare: note: {note}", file=sys.stderr)
    print(_caption(result) + "\n\n" + render_table(result))
    try:
        paths = write_outputs(result, args.out)
    except OSError as err:
        print(f"hai-compare: error: --out {args.out}: cannot write there ({err.strerror or err})", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
