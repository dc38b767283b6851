"""Pricing schedules (parallel/pipeline/simulate.py): the simulated bubbles equal Table 2's formulas exactly
under the conditions the module states (and differ outside them), the timeline obeys the data flow, and the
trace and PNG views are written."""

from __future__ import annotations

import json

import pytest

from parallel.pipeline.action import Action
from parallel.pipeline.schedule import ScheduleError, build_schedule, make_schedule
from parallel.pipeline.simulate import Costs, Timeline, plot_timeline, write_chrome_trace
from parallel.pipeline.simulate import formula_bubble as _formula
from parallel.pipeline.simulate import simulate as _simulate


def simulate(name: str, ranks: int, n: int, costs, lists=None, **kwargs) -> Timeline:
    return _simulate(make_schedule(name, ranks), n, costs, lists, **kwargs)


def formula_bubble(name: str, ranks: int, costs: Costs) -> float:
    return _formula(make_schedule(name, ranks), costs)


# F, B (full backward), W, F&B
ANY_COSTS = [Costs(1, 2, 1, 2.5), Costs(1, 2, 0.7, 3), Costs(1, 1, 0.5, 1.5), Costs(2, 3, 1, 4), Costs(0.3, 2.5, 2)]
# ZB1P is exact when W <= min(F, B - W); DualPipe(V) when also B - W = F and B <= F&B <= F + B
ZB_COSTS = [Costs(1, 2, 1), Costs(1, 2, 0.7), Costs(1, 1, 0.5), Costs(2, 3, 1)]
DUAL_COSTS = [Costs(1, 2, 1, 2.5), Costs(1, 2, 1, 3), Costs(1, 1.5, 0.5, 2), Costs(2, 3, 1, 3), Costs(1, 1.2, 0.2, 2)]


@pytest.mark.parametrize("ranks,n", [(1, 1), (1, 5), (2, 4), (3, 7), (4, 8), (4, 12), (8, 16), (4, 2), (8, 3)])
def test_1f1b_bubble_is_table_2_on_every_rank(ranks, n):
    for costs in ANY_COSTS:
        bubbles = simulate("1f1b", ranks, n, costs).bubbles
        assert bubbles == pytest.approx([formula_bubble("1f1b", ranks, costs)] * ranks, abs=1e-9)


@pytest.mark.parametrize("ranks,n", [(1, 3), (2, 4), (3, 7), (4, 4), (4, 8), (4, 12), (8, 16), (8, 9)])
def test_zb1p_bubble_is_table_2_on_every_rank(ranks, n):
    for costs in ZB_COSTS:
        bubbles = simulate("zb1p", ranks, n, costs).bubbles
        assert bubbles == pytest.approx([formula_bubble("zb1p", ranks, costs)] * ranks, abs=1e-9)


def test_zb1p_formula_needs_enough_microbatches_and_short_w():
    costs = Costs(1, 2, 1)
    assert max(simulate("zb1p", 4, 2, costs).bubbles) > formula_bubble("zb1p", 4, costs) + 1  # C < PP
    for costs in [Costs(0.5, 3, 1.5), Costs(2, 1.5, 1)]:  # W > F; W > B - W
        assert max(simulate("zb1p", 4, 8, costs).bubbles) > formula_bubble("zb1p", 4, costs) + 0.1


def dual_rank_bubble(name: str, ranks: int, rank: int, costs: Costs) -> float:
    """Table 2 is the middle ranks' bubble; a rank pos places from the end runs max(0, half-2-pos) fewer FB pairs
    than they do, so it is busier by that many (F + B - F&B)."""
    half, pos = (ranks // 2, min(rank, ranks - 1 - rank)) if name == "dualpipe" else (ranks, rank)
    return formula_bubble(name, ranks, costs) - max(0, half - 2 - pos) * (costs.F + costs.B - costs.overlapped)


@pytest.mark.parametrize("name,ranks,n", [("dualpipe", r, c) for r, c in [(2, 4), (4, 8), (4, 12), (6, 12),
                                                                          (8, 16), (8, 24), (8, 32), (10, 20)]]
                         + [("dualpipev", r, c) for r, c in [(1, 2), (2, 4), (3, 6), (3, 11), (4, 8), (4, 12),
                                                             (5, 10), (8, 16)]])
def test_dualpipe_bubble_is_table_2_on_the_most_bubbled_rank(name, ranks, n):
    for costs in DUAL_COSTS:
        bubbles = simulate(name, ranks, n, costs).bubbles
        assert max(bubbles) == pytest.approx(formula_bubble(name, ranks, costs), abs=1e-9)
        assert bubbles == pytest.approx([dual_rank_bubble(name, ranks, r, costs) for r in range(ranks)], abs=1e-9)


@pytest.mark.parametrize("costs", [
    Costs(1, 2, 0.7, 3),  # B - W != F
    Costs(1, 2.5, 1.5, 3),  # W > F
    Costs(1, 2, 1, 1.5),  # F&B < B
    Costs(1, 2, 1, 3.5),  # F&B > F + B
])
@pytest.mark.parametrize("name,ranks,n", [("dualpipe", 8, 16), ("dualpipev", 4, 8)])
def test_dualpipe_formula_fails_outside_its_conditions(costs, name, ranks, n):
    assert abs(max(simulate(name, ranks, n, costs).bubbles) - formula_bubble(name, ranks, costs)) > 0.05


def test_dualpipe_formula_holds_more_widely_on_short_pipelines():
    for costs in ANY_COSTS + [Costs(1, 2, 1, 1.5), Costs(1, 2, 1, 3.5)]:
        assert simulate("dualpipe", 2, 4, costs).bubbles == [0.0, 0.0] == [formula_bubble("dualpipe", 2, costs)] * 2
        assert simulate("dualpipev", 1, 3, costs).bubbles == [0.0]
    costs = Costs(1, 2, 1, 3.5)  # F&B > F + B
    assert max(simulate("dualpipe", 4, 8, costs).bubbles) == pytest.approx(formula_bubble("dualpipe", 4, costs))


def test_dualpipev_is_dualpipe_cut_in_half():
    for costs in DUAL_COSTS + ANY_COSTS:
        assert simulate("dualpipev", 4, 8, costs).bubbles == pytest.approx(
            simulate("dualpipe", 8, 16, costs).bubbles[:4], abs=1e-9)


@pytest.mark.parametrize("name,ranks,n", [("1f1b", 4, 8), ("zb1p", 3, 5), ("dualpipe", 4, 10), ("dualpipev", 3, 7)])
@pytest.mark.parametrize("p2p", [0.0, 0.4])
def test_timeline_obeys_the_data_flow(name, ranks, n, p2p):
    """Independent of the simulator's code: each rank's events in list order without overlap, each F after the
    previous stage's F, each B after its F and the next stage's B, each W after its B (+ p2p across ranks)."""
    costs = Costs(1, 2, 0.5, 2.5, p2p=p2p)
    timeline = simulate(name, ranks, n, costs)
    schedule = make_schedule(name, ranks)
    end: dict[tuple[str, int, int], tuple[int, float]] = {}
    for rank, events in enumerate(timeline.events):
        assert [a for _, _, a in events] == build_schedule(name, ranks, rank, n)
        for (_, e0, _), (s1, _, _) in zip(events, events[1:]):
            assert e0 <= s1 + 1e-12
        for start, stop, action in events:
            assert stop - start == pytest.approx(costs(rank, action))
            for part in action.parts():
                end[(part.kind, schedule.stage_of(rank, part.phase), part.microbatch)] = (rank, stop)
    last = schedule.n_stages - 1
    for rank, events in enumerate(timeline.events):
        for start, _, action in events:
            for part in action.parts():
                s, m = schedule.stage_of(rank, part.phase), part.microbatch
                assert schedule.owner(s, schedule.direction_of(m, n)) == (rank, part.phase)
                needs = {"F": [("F", s - 1, m)] if s else [],
                         "B": [("F", s, m)] + ([("B", s + 1, m)] if s < last else []),
                         "W": [("B", s, m)]}[part.kind]
                for key in needs:
                    producer, done = end[key]
                    assert start >= done + (p2p if producer != rank else 0) - 1e-12


@pytest.mark.parametrize("name,ranks,n", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8)])
def test_makespan_bounds_every_rank_busy_time(name, ranks, n):
    for costs in ANY_COSTS:
        timeline = simulate(name, ranks, n, costs)
        assert all(timeline.makespan >= timeline.busy(r) - 1e-12 for r in range(ranks))
        assert all(b >= -1e-12 for b in timeline.bubbles)
    one = simulate("1f1b", 1, 6, Costs(1, 2, 1, p2p=5))
    assert one.makespan == pytest.approx(6 * 3) and one.bubbles == [0.0]  # no links, no latency, no bubble


@pytest.mark.parametrize("name,ranks,n", [("1f1b", 4, 8), ("zb1p", 2, 4), ("dualpipe", 4, 8), ("dualpipev", 2, 4)])
def test_p2p_latency_lengthens_the_step(name, ranks, n):
    base = simulate(name, ranks, n, Costs(1, 2, 1, 2.5)).makespan
    slow = simulate(name, ranks, n, Costs(1, 2, 1, 2.5, p2p=0.3)).makespan
    assert slow > base + 0.3
    assert simulate(name, ranks, n, lambda r, a: Costs(1, 2, 1, 2.5)(r, a), p2p=0.3).makespan == slow


def test_callable_costs_price_each_action():
    uniform = Costs(1, 2, 1, 2.5)
    assert simulate("dualpipe", 4, 8, uniform).events == simulate("dualpipe", 4, 8, lambda r, a: uniform(r, a)).events

    def slow_rank_2(rank: int, action: Action) -> float:
        return uniform(rank, action) * (3 if rank == 2 else 1)

    timeline = simulate("zb1p", 4, 8, slow_rank_2)
    for rank, events in enumerate(timeline.events):
        assert all(end - start == pytest.approx(slow_rank_2(rank, a)) for start, end, a in events)
    assert timeline.busy(2) == pytest.approx(3 * timeline.busy(0))
    assert timeline.makespan >= timeline.busy(2) > simulate("zb1p", 4, 8, uniform).makespan


def test_timeline_from_plain_event_lists():
    f, b = Action("F", 0, 0), Action("B", 0, 0)
    timeline = Timeline([[(0.0, 1.0, f), (1.5, 3.0, b)], [(1.0, 2.0, f), (2.0, 2.5, b)]], name="1f1b")
    assert timeline.num_ranks == 2 and timeline.makespan == 3.0
    assert timeline.busy(0) == 2.5 and timeline.bubble(0) == 0.5 and timeline.bubbles == [0.5, 1.5]
    assert Timeline([]).makespan == 0.0


def test_costs_and_formula_reject_nonsense():
    with pytest.raises(ValueError, match="cannot exceed B"):
        Costs(1, 1, 2)
    with pytest.raises(ValueError, match="must not be negative"):
        Costs(1, 2, 1, p2p=-1)
    with pytest.raises(ScheduleError, match="gpipe"):
        formula_bubble("gpipe", 4, Costs(1, 2, 1))
    assert Costs(1, 2, 1)(0, Action("FB", forward=Action("F", 0, 1), backward=Action("B", 1, 0))) == 3
    assert Costs(1, 2, 0.5)(0, Action("B", 0, 0, defer_w=True)) == 1.5


def test_chrome_trace_has_one_event_per_action(tmp_path):
    timeline = simulate("dualpipe", 4, 8, Costs(1, 2, 1, 2.5))
    path = tmp_path / "trace.json"
    write_chrome_trace(timeline, path)
    trace = json.loads(path.read_text())["traceEvents"]
    complete = [e for e in trace if e["ph"] == "X"]
    actions = [a for events in timeline.events for _, _, a in events]
    assert len(complete) == len(actions)
    assert sorted(e["name"] for e in complete) == sorted(str(a) for a in actions)
    assert {e["pid"] for e in complete} == {0, 1, 2, 3}
    assert sorted(e["args"]["name"] for e in trace if e["ph"] == "M") == [f"rank {r}" for r in range(4)]
    start, end, action = timeline.events[1][0]
    first = next(e for e in complete if e["pid"] == 1)
    assert first["ts"] == start * 1e6 and first["dur"] == (end - start) * 1e6
    assert first["args"] == {"microbatch": action.microbatch, "phase": action.phase, "defer_w": False}
    fb = next(e for e in complete if e["name"].startswith("FB["))
    assert len(fb["args"]["microbatch"]) == 2


def test_png_is_written(tmp_path):
    path = tmp_path / "dualpipe.png"
    plot_timeline(simulate("dualpipe", 4, 8, Costs(1, 2, 1, 2.5)), path)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
