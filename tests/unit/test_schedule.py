"""Pipeline schedules as objects (parallel/pipeline/schedule.py, validate.py): every schedule validates, runs each owned
(stage, micro-batch) once with the counts and peak activations the paper and the reference give, and the
validator catches broken lists (missing or misordered actions, links out of FIFO order, deadlocks, bad configs)."""

from __future__ import annotations

import pytest

from parallel.pipeline.action import Action
from parallel.pipeline.schedule import ForwardOnly, ScheduleError, build_schedule, make_schedule
from parallel.pipeline.validate import peak_activations
from parallel.pipeline.validate import validate_schedule as _validate


def validate_schedule(name: str, ranks: int, n: int, lists=None, **kwargs) -> None:
    _validate(make_schedule(name, ranks), n, lists, **kwargs)


def check_schedule_args(name: str, ranks: int, n: int) -> None:
    make_schedule(name, ranks).check_microbatches(n)

CONFIGS = (
    [("1f1b", r, c) for r, c in [(1, 1), (1, 4), (2, 4), (3, 7), (4, 8), (4, 12), (8, 16), (4, 2), (8, 3)]]
    + [("zb1p", r, c) for r, c in [(1, 1), (1, 4), (2, 4), (3, 7), (4, 8), (4, 12), (8, 16), (4, 2), (8, 3)]]
    + [("dualpipe", r, c) for r, c in [(2, 4), (2, 6), (4, 8), (4, 10), (4, 12), (6, 12), (8, 16), (8, 20)]]
    + [("dualpipev", r, c) for r, c in [(1, 2), (1, 3), (2, 4), (3, 6), (3, 7), (4, 8), (4, 12), (5, 11), (8, 16)]]
)


def schedules(name: str, ranks: int, n: int) -> list[list[Action]]:
    return [build_schedule(name, ranks, r, n) for r in range(ranks)]


def plain(actions: list[Action]) -> list[Action]:
    return [part for a in actions for part in a.parts()]


def dual_position(name: str, ranks: int, rank: int) -> tuple[int, int]:
    """(half, pos) of the reference's 8 steps: DualPipe pairs rank r with R-1-r, DualPipeV does not."""
    return (ranks // 2, min(rank, ranks - 1 - rank)) if name == "dualpipe" else (ranks, rank)


@pytest.mark.parametrize("name,ranks,n", CONFIGS)
def test_schedule_is_valid(name, ranks, n):
    validate_schedule(name, ranks, n)


@pytest.mark.parametrize("name,ranks,n", CONFIGS)
def test_counts_match_stage_ownership(name, ranks, n):
    for rank, actions in enumerate(schedules(name, ranks, n)):
        parts = plain(actions)
        for phase in range(make_schedule(name, ranks).phases):
            fs = [p.microbatch for p in parts if p.kind == "F" and p.phase == phase]
            bs = [p.microbatch for p in parts if p.kind == "B" and p.phase == phase]
            if name == "dualpipe":  # each end feeds half the micro-batches, one direction per phase
                expected = [m for m in range(n) if make_schedule(name, ranks).direction_of(m, n) == phase]
                assert expected == list(range(phase * n // 2, (phase + 1) * n // 2))
            else:
                expected = list(range(n))
            assert fs == expected and bs == expected  # each once, in micro-batch order
        ws = [p for p in parts if p.kind == "W"]
        deferred = [p for p in parts if p.kind == "B" and p.defer_w]
        assert sorted((w.phase, w.microbatch) for w in ws) == sorted((b.phase, b.microbatch) for b in deferred)
        if name == "1f1b":
            assert not ws
        elif name == "zb1p":
            assert len(ws) == n and all(p.defer_w for p in parts if p.kind == "B")
        else:  # deferred in steps 3 and 7 (half - pos - 1 each) and in the second half of step 6 (pos + 1)
            half, pos = dual_position(name, ranks, rank)
            assert len(ws) == 2 * (half - pos - 1) + pos + 1


@pytest.mark.parametrize("name,ranks,n", [c for c in CONFIGS if c[0] in ("dualpipe", "dualpipev")])
def test_dualpipe_overlaps_the_steady_phase_and_defers_w_only_around_it(name, ranks, n):
    per_phase = n // 2 if name == "dualpipe" else n
    for rank, actions in enumerate(schedules(name, ranks, n)):
        half, pos = dual_position(name, ranks, rank)
        main_steps = per_phase - 2 * half + pos + 1
        fb = [i for i, a in enumerate(actions) if a.kind == "FB"]
        # two pairs per main step (the middle rank runs its first one apart), one per step 5
        assert len(fb) == 2 * main_steps - (pos == half - 1) + (half - pos - 1)
        assert not any(actions[i].backward.defer_w for i in fb)
        inside = actions[fb[0]:fb[-1] + 1]
        assert not any(a.kind == "W" or a.defer_w for a in inside)


@pytest.mark.parametrize("name,ranks,n", CONFIGS)
def test_peak_activations(name, ranks, n):
    """In chunks of one stage for one micro-batch: 1F1B and ZB1P hold min(PP - r, C) on rank r (Table 2: PP on
    rank 0); DualPipe PP + 1 on every rank; DualPipeV 2 PP + 1 of its half-size stages on every rank (Table 2's
    PP + 1 counted in its 2 PP stages)."""
    peaks = [peak_activations(actions) for actions in schedules(name, ranks, n)]
    if name in ("1f1b", "zb1p"):
        assert peaks == [min(ranks - r, n) for r in range(ranks)]
    elif name == "dualpipe":
        assert peaks == [ranks + 1] * ranks
    else:
        assert peaks == [2 * ranks + 1] * ranks


def test_peak_activations_counts_an_fb_forward_before_its_backward_frees():
    f, b = Action("F", 0, 1), Action("B", 1, 0)
    assert peak_activations([Action("F", 1, 0), Action("FB", forward=f, backward=b), Action("B", 0, 1)]) == 2
    assert peak_activations([Action("F", 1, 0), Action("B", 1, 0), Action("F", 0, 1), Action("B", 0, 1)]) == 1


def test_links_are_fifo_without_tags_only_for_short_dual_pipelines():
    """The reference receives the first main-step forward's input at the end of step 2, ahead of step 3's
    gradients; in action order (no receive ahead) the two kinds of tensor on a link therefore need tags from
    DualPipe PP=6 and DualPipeV PP=3 on."""
    for name, ranks, n in CONFIGS:
        if ranks <= (4 if name == "dualpipe" else 2) or name in ("1f1b", "zb1p"):
            validate_schedule(name, ranks, n, p2p="untagged")
    with pytest.raises(ScheduleError, match=r"link rank 0 -> rank 1 is not FIFO.*B1\.8\*"):
        validate_schedule("dualpipe", 8, 16, p2p="untagged")
    with pytest.raises(ScheduleError, match="not FIFO"):
        validate_schedule("dualpipev", 3, 6, p2p="untagged")


# ---- the validator fails where it should ----------------------------------------------------------------------
def mutated(name: str, ranks: int, n: int, rank: int, edit) -> list[list[Action]]:
    lists = schedules(name, ranks, n)
    lists[rank] = edit(list(lists[rank]))
    return lists


def swap(i: int, j: int):
    def edit(actions):
        actions[i], actions[j] = actions[j], actions[i]
        return actions
    return edit


def test_dropped_actions_are_named():
    lists = mutated("1f1b", 4, 8, 1, lambda a: [x for x in a if x != Action("B", 0, 7)])
    with pytest.raises(ScheduleError, match=r"1f1b rank 1: no B for phase 0 micro-batch 7"):
        validate_schedule("1f1b", 4, 8, lists)
    lists = mutated("1f1b", 4, 8, 2, lambda a: [x for x in a if x != Action("F", 0, 3)])
    with pytest.raises(ScheduleError, match=r"rank 2, action \d+ B0\.3: B of phase 0 micro-batch 3 does not follow"):
        validate_schedule("1f1b", 4, 8, lists)
    lists = mutated("zb1p", 4, 8, 3, lambda a: [x for x in a if x != Action("W", 0, 5)])
    with pytest.raises(ScheduleError, match=r"zb1p rank 3: B0\.5 deferred its weight gradients but no W"):
        validate_schedule("zb1p", 4, 8, lists)
    lists = mutated("dualpipe", 4, 8, 0, lambda a: a[:-1])
    with pytest.raises(ScheduleError, match=r"dualpipe rank 0: B0\.3 deferred"):
        validate_schedule("dualpipe", 4, 8, lists)


def test_misordered_duplicated_and_misplaced_actions_are_named():
    last = schedules("1f1b", 4, 8)[3]
    assert last[:2] == [Action("F", 0, 0), Action("B", 0, 0)]
    with pytest.raises(ScheduleError, match=r"1f1b rank 3, action 0 B0\.0: B of phase 0 micro-batch 0 does not "
                                            r"follow its F"):
        validate_schedule("1f1b", 4, 8, mutated("1f1b", 4, 8, 3, swap(0, 1)))
    zb = schedules("zb1p", 2, 4)[1]
    i, j = zb.index(Action("B", 0, 0, defer_w=True)), zb.index(Action("W", 0, 0))
    with pytest.raises(ScheduleError, match=r"W of phase 0 micro-batch 0 does not follow its B"):
        validate_schedule("zb1p", 2, 4, mutated("zb1p", 2, 4, 1, swap(i, j)))
    with pytest.raises(ScheduleError, match=r"a second F of phase 0 micro-batch 0"):
        validate_schedule("1f1b", 2, 4, mutated("1f1b", 2, 4, 0, lambda a: [Action("F", 0, 0)] + a))
    with pytest.raises(ScheduleError, match=r"but its B did not defer"):
        validate_schedule("1f1b", 2, 4, mutated("1f1b", 2, 4, 0, lambda a: a + [Action("W", 0, 0)]))
    # direction-1 micro-batches run on phase 1 only; 1f1b has one phase
    with pytest.raises(ScheduleError, match=r"micro-batch 4 does not run phase 0 \(stage 1\) on this rank"):
        validate_schedule("dualpipe", 4, 8, mutated("dualpipe", 4, 8, 1, lambda a: [Action("F", 0, 4)] + a))
    with pytest.raises(ScheduleError, match=r"does not run phase 1 \(1f1b has 1\)"):
        validate_schedule("1f1b", 2, 4, mutated("1f1b", 2, 4, 0, lambda a: [Action("F", 1, 0)] + a))
    with pytest.raises(ScheduleError, match=r"3 action lists for 2 ranks"):
        validate_schedule("1f1b", 2, 4, schedules("1f1b", 3, 4))


def test_sends_out_of_order_on_a_link_are_caught():
    first = schedules("1f1b", 4, 8)[0]
    assert first[:2] == [Action("F", 0, 0), Action("F", 0, 1)]
    with pytest.raises(ScheduleError, match=r"link rank 0 -> rank 1 \(activations\) is not FIFO: tensor 0 sent is "
                                            r"the activation into stage 1 of micro-batch 1"):
        validate_schedule("1f1b", 4, 8, mutated("1f1b", 4, 8, 0, swap(0, 1)))
    # gradients: rank 2 ends with B0.6 B0.7, sending both to rank 1
    third = schedules("1f1b", 4, 8)[2]
    assert third[-2:] == [Action("B", 0, 6), Action("B", 0, 7)]
    with pytest.raises(ScheduleError, match=r"link rank 2 -> rank 1 \(gradients\) is not FIFO: tensor 6 sent is the "
                                            r"gradient into stage 1 of micro-batch 7"):
        validate_schedule("1f1b", 4, 8, mutated("1f1b", 4, 8, 2, swap(-2, -1)))


def test_deadlocks_name_each_blocked_rank_and_what_it_waits_for():
    lists = schedules("1f1b", 2, 4)
    lists[0] = lists[1]  # no warm-up on rank 0: F0 B0 F1 B1 ...
    lists[1] = [Action("F", 0, 0), Action("F", 0, 1), Action("B", 0, 0), Action("F", 0, 2), Action("B", 0, 1),
                Action("F", 0, 3), Action("B", 0, 2), Action("B", 0, 3)]
    with pytest.raises(ScheduleError, match=r"deadlocks: rank 0 at action 1 B0\.0 waits for B of stage 1 "
                                            r"micro-batch 0 \(rank 1\); rank 1 at action 1 F0\.1 waits for F of "
                                            r"stage 0 micro-batch 1 \(rank 0\)"):
        validate_schedule("1f1b", 2, 4, lists)
    # dualpipe: each end starts with the other end's micro-batch
    lists = [swap(0, 1)(actions) for actions in schedules("dualpipe", 2, 4)]
    with pytest.raises(ScheduleError, match=r"rank 0 at action 0 F1\.2 waits for F of stage 0 micro-batch 2 "
                                            r"\(rank 1\); rank 1 at action 0 F0\.0 waits for F of stage 0"):
        validate_schedule("dualpipe", 2, 4, lists)


@pytest.mark.parametrize("args,message", [
    (("dualpipe", 3, 12), r"parallel.schedule=dualpipe needs an even number of pipeline ranks, got parallel.pp=3; "
                          r"use dualpipev or an even pp"),
    (("dualpipe", 4, 9), r"parallel.microbatches=9 must be even"),
    (("dualpipev", 4, 6), r"parallel.microbatches=6 is below 2 x pp = 8 \(parallel.pp=4\)"),
    (("dualpipe", 4, 6), r"parallel.microbatches=6 is below 2 x pp = 8"),
    (("gpipe", 2, 4), r"parallel.schedule='gpipe' does not exist; choose one of 1f1b, zb1p, dualpipe, dualpipev"),
    (("1f1b", 0, 4), r"parallel.pp=0"),
    (("1f1b", 2, 0), r"parallel.microbatches=0"),
])
def test_bad_configurations_name_the_key_and_the_fix(args, message):
    with pytest.raises(ScheduleError, match=message):
        check_schedule_args(*args)
    with pytest.raises(ScheduleError, match=message):
        build_schedule(args[0], args[1], 0, args[2])
    with pytest.raises(ValueError, match=message):  # ScheduleError is a ValueError
        validate_schedule(*args)


def test_rank_out_of_range():
    with pytest.raises(ScheduleError, match=r"pipeline rank 2 does not exist with parallel.pp=2"):
        build_schedule("1f1b", 2, 2, 4)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_forward_only_schedule_runs_every_micro_batch_once_per_stage(name):
    """Evaluation: each stage a rank owns sees each of its micro-batches once, in order, and the replay of the
    data flow (F needs the previous stage's F) completes."""
    ranks, n = 4, 8
    schedule = ForwardOnly(make_schedule(name, ranks))
    lists = [schedule.actions(r, n) for r in range(ranks)]
    done = set()
    progress = True
    while progress:  # a forward runs once its input stage has run the micro-batch (sends never block)
        progress = False
        for r, actions in enumerate(lists):
            while actions:
                a = actions[0]
                s = schedule.stage_of(r, a.phase)
                if s > 0 and (s - 1, a.microbatch) not in done:
                    break
                done.add((s, a.microbatch))
                actions.pop(0)
                progress = True
    assert not any(lists), "forward-only schedule deadlocks"
    stages = 2 * ranks if name == "dualpipev" else ranks
    assert done == {(s, m) for s in range(stages) for m in range(n)}
    assert all(a.kind == "F" for r in range(ranks) for a in schedule.actions(r, n))
