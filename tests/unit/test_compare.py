"""hai-compare on run directories written here (a config and random metrics records): every number of compare.json
against the same quantity recomputed from the records, the seed grouping and its band, the baseline, the diff of
the configs, the files written, and each bad input (one paragraph, exit code 2, no traceback)."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.compare import compare, main, write_outputs

BASE = {
    "model": {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_mtp_depth": 1, "balance": "aux_free", "yarn": None,
              "recompute_norm": False},
    "data": {"seq_len": 64, "datasets": [], "tokenizer": None, "fim_rate": 0.1, "cache_dir": "~/.cache/hai-llm"},
    "optim": {"lr": 0.002, "tail_lrs": [0.0002, 6.6e-05]},
    "trainer": {"seed": 0, "max_steps": 10, "run_dir": None},
    "logging": {"plot": True},
}


def make_run(path: Path, rng: random.Random, steps: int, eval_every: int = 4, final_val: float | None = None,
             config: dict | None = None, **overrides) -> list[dict]:
    """A run directory of `steps` random training records, a validation record every `eval_every` steps (and at
    the end, with val_loss `final_val` when given), .hydra/config.yaml = BASE with the dotted `overrides` (keys
    written with "__" for "."), .hydra/overrides.yaml; returns the records as written."""
    cfg = copy.deepcopy(BASE if config is None else config)
    lines = []
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        lines.append(f"{'.'.join(parents + [leaf])}={value}")
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(lines), path / ".hydra" / "overrides.yaml")
    records = []
    for step in range(1, steps + 1):
        loss = rng.uniform(2, 9) if rng.random() > 0.1 else None  # a skipped (non-finite) step logs null
        records.append({"split": "train", "step": step, "tokens": 512 * step, "loss": loss,
                        "lm_loss": rng.uniform(2, 8), "mtp_loss": rng.uniform(2, 8), "maxvio": rng.uniform(0, 2),
                        "tokens_per_s": rng.uniform(1e3, 9e3), "maxvio_layer": {"layers.1.ffn.gate": 0.5}})
        if step % eval_every == 0 or step == steps:
            val = final_val if step == steps and final_val is not None else rng.uniform(2, 8)
            records.append({"step": step, "split": "valid", "val_loss": val, "val_loss_by_position": [val] * 8})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def expected(records: list[dict]) -> dict:
    """The row's metrics recomputed from the records: the last training record's step and tokens; the last and the
    lowest val_loss; means over the last ceil(10%) (at least 1) training records, nulls left out."""
    train = [r for r in records if r["split"] == "train"]
    val = [r["val_loss"] for r in records if r["split"] == "valid"]
    tail = train[len(train) - max(1, -(-len(train) // 10)):]

    def mean(key):
        values = [r[key] for r in tail if r[key] is not None]
        return sum(values) / len(values) if values else None
    return {"steps": train[-1]["step"], "tokens": train[-1]["tokens"], "final_val_loss": val[-1] if val else None,
            "best_val_loss": min(val) if val else None, "train_loss_last10": mean("loss"),
            "lm_loss_last10": mean("lm_loss"), "maxvio_last10": mean("maxvio"), "tokens_per_s": mean("tokens_per_s")}


def close(a, b) -> bool:
    return a == b if a is None or b is None else a == pytest.approx(b, rel=1e-12, abs=1e-12)


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("baseline", [0, 2])
def test_every_number_is_the_records(tmp_path, capsys, baseline):
    rng = random.Random(baseline)
    points = [("aux_free", 0.002), ("aux_loss", 0.002), ("none", 0.001)]
    dirs, records = [], []
    for i, (balance, lr) in enumerate(points):
        dirs.append(tmp_path / f"run{i}")
        records.append(make_run(dirs[-1], rng, rng.randint(5, 45), rng.randint(2, 6), model__balance=balance,
                                optim__lr=lr))
    out = tmp_path / "out"
    code, stdout, err = run_cli([*dirs, "--baseline", baseline, "--out", out], capsys)
    assert code == 0, err
    result = json.loads((out / "compare.json").read_text())
    assert result["baseline"] == baseline and len(result["rows"]) == 3
    base = expected(records[baseline])
    for row, path, recs, (balance, lr) in zip(result["rows"], dirs, records, points):
        want = expected(recs)
        assert row["run"] == str(path)
        assert row["overrides"] == {"model.balance": balance, "optim.lr": lr}
        for key, value in want.items():
            assert close(row[key], value), key
        for key in ("final_val_loss", "train_loss_last10"):
            delta = None if want[key] is None or base[key] is None else want[key] - base[key]
            assert close(row[f"delta_{key}"], delta), key
        assert row["skipped_lines"] == 0
    table = [line for line in stdout.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip() for line in table] == ["0", "1", "2"]
    assert ["baseline" in line for line in table] == [i == baseline for i in range(3)]


def test_overrides_list_only_the_keys_that_differ(tmp_path, capsys):
    rng = random.Random(1)
    make_run(tmp_path / "a", rng, 6, trainer__run_dir=str(tmp_path / "a"))
    make_run(tmp_path / "b", rng, 6, model__yarn={"factor": 4.0}, model__recompute_norm=True,
             trainer__run_dir=str(tmp_path / "b"), data__cache_dir="/elsewhere")
    result = compare([tmp_path / "a", tmp_path / "b"])
    assert result["config_source"] == "config.yaml"
    # where a run writes or caches is no difference; yarn null vs a mapping shows both of its keys
    assert result["rows"][0]["overrides"] == {"model.yarn": None, "model.recompute_norm": False,
                                              "model.yarn.factor": None}
    assert result["rows"][1]["overrides"] == {"model.yarn": None, "model.recompute_norm": True,
                                              "model.yarn.factor": 4.0}

    # a run without config.yaml: every run compared by its command line instead, and the output says so
    (tmp_path / "b" / ".hydra" / "config.yaml").unlink()
    code, out, err = run_cli([tmp_path / "a", tmp_path / "b", "--out", tmp_path / "out"], capsys)
    assert code == 0 and "overrides.yaml" in err and str(tmp_path / "b") in err
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]
    assert [r["overrides"] for r in rows] == [
        {"model.yarn": None, "model.recompute_norm": None},
        {"model.yarn": "{'factor': 4.0}", "model.recompute_norm": "True"}]


def test_seeds_make_one_row_with_its_band_and_the_baseline_against_it(tmp_path, capsys):
    rng = random.Random(2)
    finals = {"aux_free": [5.00, 5.04, 4.98], "aux_loss": [6.00, 6.02, 5.99], "none": [5.01, 4.99]}
    records: dict[str, list[list[dict]]] = {}
    for balance, values in finals.items():
        for seed, final in enumerate(values):
            records.setdefault(balance, []).append(
                make_run(tmp_path / "sweep" / f"{balance}_{seed}", rng, rng.randint(8, 30), final_val=final,
                         model__balance=balance, trainer__seed=seed * 7))
    code, out, err = run_cli([tmp_path / "sweep", "--seeds", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]
    assert [r["overrides"] for r in rows] == [{"model.balance": b} for b in finals]
    summaries = {}
    for row, balance in zip(rows, finals):
        members = [expected(r) for r in records[balance]]
        assert row["n_seeds"] == len(members) and row["seeds"] == [7 * s for s in range(len(members))]
        assert [m["run"] for m in row["runs"]] == [str(tmp_path / "sweep" / f"{balance}_{s}")
                                                   for s in range(len(members))]
        for member, want in zip(row["runs"], members):
            assert all(close(member[k], v) for k, v in want.items())
        for key in members[0]:
            values = [m[key] for m in members if m[key] is not None]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            assert close(row[key], mean), key
            assert close(row["spread"][key]["min"], min(values)) and close(row["spread"][key]["max"], max(values))
            assert row["spread"][key]["std"] == pytest.approx(std, rel=1e-9, abs=1e-12), key
        summaries[balance] = row
    base = summaries["aux_free"]
    assert base["exceeds_spread_final_val_loss"] is None and base["delta_final_val_loss"] == 0
    for balance in ("aux_loss", "none"):
        row = summaries[balance]
        for key in ("final_val_loss", "train_loss_last10"):
            delta = row[key] - base[key]
            spread = max(r["spread"][key]["max"] - r["spread"][key]["min"] for r in (row, base))
            assert close(row[f"delta_{key}"], delta) and close(row[f"spread_{key}"], spread)
            assert row[f"exceeds_spread_{key}"] == (abs(delta) > spread)
    assert summaries["aux_loss"]["exceeds_spread_final_val_loss"] is True  # 1.0 apart, seeds within 0.06
    assert summaries["none"]["exceeds_spread_final_val_loss"] is False
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert "> spread 0.0600" in table[2] and "within spread 0.0600" in table[3] and " ± " in table[1]


def test_one_seed_per_point_has_no_band(tmp_path):
    rng = random.Random(3)
    make_run(tmp_path / "a", rng, 5, model__balance="aux_free")
    make_run(tmp_path / "b", rng, 5, model__balance="aux_loss")
    rows = compare([tmp_path], seeds=True)["rows"]
    assert [r["n_seeds"] for r in rows] == [1, 1]
    assert rows[1]["spread_final_val_loss"] is None and rows[1]["exceeds_spread_final_val_loss"] is None
    assert rows[1]["spread"]["final_val_loss"]["std"] is None


def test_outputs_are_written_and_the_api_matches_the_cli(tmp_path, capsys):
    rng = random.Random(4)
    for i in range(2):
        make_run(tmp_path / "m" / str(i), rng, 12, model__balance=["aux_free", "aux_loss"][i])
    result = compare([tmp_path / "m"], baseline=1)
    paths = write_outputs(result, tmp_path / "api")
    assert [p.name for p in paths] == ["compare.md", "compare.json", "compare.png"]
    assert (tmp_path / "api" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "api" / "compare.md").read_text()
    assert "| # " in md and "model.balance=aux_free" in md and "model.balance=aux_loss" in md and "baseline" in md
    assert json.loads((tmp_path / "api" / "compare.json").read_text()) == result
    code, out, _ = run_cli([tmp_path / "m", "--baseline", 1, "--out", tmp_path / "cli"], capsys)
    assert code == 0 and json.loads((tmp_path / "cli" / "compare.json").read_text()) == result
    assert md.split("\n\n", 2)[2].split("\n\n")[0].strip() in out  # the printed table is compare.md's


def test_multirun_points_in_natural_order_each_run_once(tmp_path):
    rng = random.Random(5)
    for n in (10, 2, 0, 1):
        make_run(tmp_path / "multirun" / "t" / str(n), rng, 3, optim__lr=n / 1000)
    (tmp_path / "multirun" / "multirun.yaml").write_text("hydra: {}\n")
    single = tmp_path / "single"
    make_run(single, rng, 3, optim__lr=0.5)
    rows = compare([tmp_path / "multirun", single, tmp_path / "multirun" / "t" / "1"])["rows"]
    assert [r["run"] for r in rows] == [str(tmp_path / "multirun" / "t" / n) for n in ("0", "1", "2", "10")] \
        + [str(single)]


def test_broken_lines_are_skipped_and_counted_per_run(tmp_path, capsys):
    rng = random.Random(6)
    recs = make_run(tmp_path / "a", rng, 9)
    make_run(tmp_path / "b", rng, 9)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"split": "train", "loss": 3.0}\n\n{"split": "train", "step": 10, "loss": 1.')
    code, out, err = run_cli([tmp_path / "a", tmp_path / "b", "--out", tmp_path / "out"], capsys)
    assert code == 0
    assert f"{tmp_path / 'a'}: 3 broken line(s) of metrics.jsonl skipped" in err and str(tmp_path / "b") not in err
    row = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][0]
    assert row["skipped_lines"] == 3 and close(row["train_loss_last10"], expected(recs)["train_loss_last10"])
    assert "3 broken line(s)" in (tmp_path / "out" / "compare.md").read_text()


def _bad_input(tmp_path: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (arguments, words the error must hold)."""
    rng = random.Random(7)
    good = tmp_path / "good"
    make_run(good, rng, 4)
    (tmp_path / "empty_dir" / "sub").mkdir(parents=True)
    empty = tmp_path / "empty"
    make_run(empty, rng, 4)
    (empty / "metrics.jsonl").write_text("")
    garbage = tmp_path / "garbage"
    make_run(garbage, rng, 4)
    (garbage / "metrics.jsonl").write_bytes(b"\x00\xff\xfe binary\n{\"split\": \"tr")
    valid_only = tmp_path / "valid_only"
    make_run(valid_only, rng, 4)
    (valid_only / "metrics.jsonl").write_text('{"step": 4, "split": "valid", "val_loss": 3.0}\n')
    dim = tmp_path / "dim128"
    make_run(dim, rng, 4, model__dim=128)
    data = tmp_path / "seq128"
    make_run(data, rng, 4, data__seq_len=128)
    bad_yaml = tmp_path / "bad_yaml"
    make_run(bad_yaml, rng, 4)
    (bad_yaml / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    return {
        "no such directory": ([tmp_path / "nope"], [str(tmp_path / "nope"), "no such directory"]),
        "no run below": ([good, tmp_path / "empty_dir"],
                         [str(tmp_path / "empty_dir"), "holds no run", "metrics.jsonl"]),
        "empty metrics": ([good, empty], [str(empty / "metrics.jsonl"), "no training record", "empty"]),
        "garbage metrics": ([garbage], [str(garbage / "metrics.jsonl"), "no training record", "2 unreadable"]),
        "no training record": ([valid_only], [str(valid_only / "metrics.jsonl"), "no training record"]),
        "model size": ([good, dim], [f"model.dim: 64 ({good}) vs 128 ({dim})", "--force"]),
        "data": ([good, data], [f"data.seq_len: 64 ({good}) vs 128 ({data})", "--force"]),
        "baseline too large": ([good, dim, "--force", "--baseline", "2"], ["--baseline 2", "2 row(s)", "0 to 1"]),
        "baseline negative": ([good, "--baseline", "-1"], ["--baseline -1", "1 row(s)"]),
        "config yaml": ([good, bad_yaml], [str(bad_yaml / ".hydra" / "config.yaml"), "not readable YAML"]),
        "no argument": ([], ["RUN_OR_MULTIRUN_DIR", "hai-compare --help"]),
    }


@pytest.mark.parametrize("case", ["no such directory", "no run below", "empty metrics", "garbage metrics",
                                  "no training record", "model size", "data", "baseline too large",
                                  "baseline negative", "config yaml", "no argument"])
def test_bad_input_is_one_paragraph_and_exit_code_2(tmp_path, capsys, case):
    args, words = _bad_input(tmp_path)[case]
    code, out, err = run_cli([*args, "--out", tmp_path / "out"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("hai-compare: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()


def test_force_compares_different_models_and_says_so(tmp_path, capsys):
    rng = random.Random(8)
    make_run(tmp_path / "a", rng, 4)
    make_run(tmp_path / "b", rng, 4, model__dim=128, model__n_layers=3)
    code, out, err = run_cli([tmp_path / "a", tmp_path / "b", "--force", "--out", tmp_path / "out"], capsys)
    assert code == 0
    assert "--force" in err and "model.dim: 64" in err and "model.n_layers: 2" in err
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["rows"]
    assert rows[1]["overrides"] == {"model.dim": 128, "model.n_layers": 3}


def test_unreadable_metrics_file_names_the_run(tmp_path, capsys, monkeypatch):
    rng = random.Random(9)
    make_run(tmp_path / "a", rng, 4)
    original = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "metrics.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", read_text)
    code, _, err = run_cli([tmp_path / "a"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'a' / 'metrics.jsonl'}: cannot be read (Permission denied)" in err
