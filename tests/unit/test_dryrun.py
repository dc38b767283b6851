"""`hai-plan --dry-run` (launch/dryrun.py): ranks built for real on the meta device over torch's fake process
group, measured from their tensors and held against the planner: the JSON keys, measured vs planned bytes within
2% on every rank of three small layouts and on ranks of the 671B model at PP16 x EP64 (2048 ranks), each
parameter owned once per model replica, and the errors for a bad world, a bad rank and a rank that does not fit.
Runs in this process (the fake group is made and destroyed per rank), one worker."""

from __future__ import annotations

import json

import pytest

from launch.dryrun import KEYS, MEASURED
from launch.plan import main
from model.params import count_params
from model.presets import load

SMALL = ["--cluster", "h800_2048", "--gpus-per-node", "2", "--workers", "1"]
LAYOUTS = {
    "dualpipe-ep2": (4, ["experiment=tiny_parallel"]),
    "1f1b-dp2": (4, ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.ep=1"]),
    "dualpipev-pp4-ep2": (8, ["parallel.pp=4", "parallel.schedule=dualpipev", "parallel.ep=2", "model.n_layers=8"]),
}


def _dry(capsys, argv: list[str]) -> tuple[int, list[dict], str]:
    code = main(argv)
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, rows, err


def _within(rows: list[dict], tolerance: float) -> None:
    for r in rows:
        for k in MEASURED:
            assert r["planned"][k] > 0
            assert abs(r[k] / r["planned"][k] - 1) <= tolerance, (r["rank"], k, r[k], r["planned"][k])


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_rank_measured_equals_planned_and_owns_each_parameter_once(capsys, name):
    world, overrides = LAYOUTS[name]
    code, rows, err = _dry(capsys, [*overrides, *SMALL, "--world", str(world), "--dry-run", "--rank", "all",
                                    "--json"])
    assert code == 0, err
    assert [r["rank"] for r in rows] == list(range(world))
    assert all(tuple(r) == KEYS for r in rows)
    assert set(rows[0]["planned"]) == {"param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes"}
    _within(rows, 0.02)
    cfg = load("tiny")
    n_layers = next((int(o.split("=")[1]) for o in overrides if o.startswith("model.n_layers=")), cfg.n_layers)
    counts = count_params(load("tiny", n_layers=n_layers))
    assert sum(r["params_owned"] for r in rows if r["edp_rank"] == 0) == counts["total"] + counts["mtp"]
    assert "parameters owned over the ranks with edp_rank 0" in err and "ok" in err


@pytest.mark.slow
def test_ranks_of_671b_on_2048_gpus_match_the_plan(capsys):
    argv = ["experiment=deepseek_v3", "fp8=emulate", "parallel.pp=16", "parallel.ep=64",
            "parallel.schedule=dualpipe",
            "parallel.gpus_per_node=8", "--world", "2048", "--dry-run", "--rank", "0,1,1000,2047", "--json",
            "--workers", "1"]
    code, rows, err = _dry(capsys, argv)
    assert code == 0, err
    assert [(r["rank"], r["pp_rank"]) for r in rows] == [(0, 0), (1, 0), (1000, 7), (2047, 15)]
    _within(rows, 0.02)
    # DualPipe: the first rank holds stages 0 and 15 (embedding, head, MTP); the middle one two middle stages
    assert rows[0]["params_held"] > rows[2]["params_held"] > 0
    assert rows[0]["params_owned"] == rows[0]["params_held"]  # pipeline rank 0, DP rank 0: owns all it holds
    assert rows[3]["params_owned"] == 0  # the mirror copy on pipeline rank 15, expert-DP index 1


def test_bad_input_is_refused_with_its_reason(capsys):
    base = ["experiment=tiny_parallel", *SMALL, "--dry-run"]
    assert main([*base, "--world", "6"]) == 2
    assert "parallel" in capsys.readouterr().err
    assert main([*base, "--world", "4", "--rank", "4"]) == 2
    assert "outside the world of 4 ranks" in capsys.readouterr().err
    assert main([*base, "--world", "4", "--rank", "x"]) == 2
    assert "--rank 'x'" in capsys.readouterr().err
    assert main([*base, "--world", "1"]) == 2
    assert "--world 1" in capsys.readouterr().err


def test_a_rank_that_does_not_fit_fails_naming_it(capsys):
    code = main(["experiment=tiny_parallel", *SMALL, "--gpu-memory-gb", "0.05", "--reserved-gb", "0", "--world", "4",
                 "--dry-run", "--rank", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: rank 2 (pipeline rank 1) needs" in err and "of 0.05 GB" in err
