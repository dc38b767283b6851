"""The pipeline's p2p order under NCCL's rules (parallel/pipeline/p2p.py, nccl_model.py).

The NCCL model is checked on small programs whose outcome follows from the rules alone (send-then-receive on
both ends deadlocks, one group call does not, tags are ignored, a wait orders what follows in the strict
variant); then the executor's order (`StepPlan.program`) runs every schedule up to PP=16 without deadlock or
swapped tensors, while the old order (each send its own call, an action's receives batched, one communicator)
deadlocks; and a schedule whose channels the grid did not build, or whose lists break a channel's order, is
refused before anything runs."""

from __future__ import annotations

import pytest

from parallel.pipeline.action import Action
from parallel.pipeline.nccl_model import Call, Op, replay
from parallel.pipeline.p2p import StepPlan, channels, check_channels, rank_channels
from parallel.pipeline.schedule import OneFOneB, ScheduleError, make_schedule
from parallel.pipeline.validate import validate_schedule


def send(peer, comm="c", payload=None):
    return Op(True, peer, comm, payload)


def recv(peer, comm="c", payload=None):
    return Op(False, peer, comm, payload)


# ---- the model's rules ----------------------------------------------------------------------------------------
def test_send_then_receive_on_both_ends_deadlocks_and_one_group_call_does_not():
    lone = [[Call(post=(send(1, payload="a"),)), Call(post=(recv(1, payload="b"),)), Call(wait=(0, 1))],
            [Call(post=(send(0, payload="b"),)), Call(post=(recv(0, payload="a"),)), Call(wait=(0, 1))]]
    for strict in (False, True):
        out = replay(lone, strict=strict)
        assert out.deadlock and "rank 0: send to rank 1 (a) on c" in out.deadlock
    batched = [[Call(post=(send(1, payload="a"), recv(1, payload="b"))), Call(wait=(0, 1))],
               [Call(post=(send(0, payload="b"), recv(0, payload="a"))), Call(wait=(0, 1))]]
    assert replay(batched).ok and replay(batched).matched == 2
    # Megatron's send_forward_recv_backward: one side batching is enough
    one_side = [batched[0], lone[1]]
    assert replay(one_side, strict=True).ok


def test_tags_are_ignored_so_a_reversed_order_swaps_tensors_unless_each_kind_has_its_communicator():
    one_comm = [[Call(post=(send(1, payload="act"),)), Call(post=(send(1, payload="grad"),))],
                [Call(post=(recv(0, payload="grad"),)), Call(post=(recv(0, payload="act"),))]]
    out = replay(one_comm)
    assert out.deadlock is None and len(out.mismatched) == 2 and "sent act" in out.mismatched[0]
    two_comms = [[Call(post=(send(1, "act", "act"),)), Call(post=(send(1, "grad", "grad"),))],
                 [Call(post=(recv(0, "grad", "grad"),)), Call(post=(recv(0, "act", "act"),))]]
    assert replay(two_comms).ok


def test_the_strict_variant_orders_later_ops_behind_a_wait():
    # each rank waits for its receive before posting the send the other one waits for
    progs = [[Call(post=(recv(1, "x"),)), Call(wait=(0,)), Call(post=(send(1, "y"),))],
             [Call(post=(recv(0, "y"),)), Call(wait=(0,)), Call(post=(send(0, "x"),))]]
    assert replay(progs, strict=False).ok
    assert "waits for ops it posted" in replay(progs, strict=True).deadlock


def test_an_unmatched_op_is_a_deadlock():
    assert replay([[Call(post=(send(1),))], []]).deadlock.startswith("rank 0: send to rank 1")
    with pytest.raises(ValueError, match="peer 0 is not another rank"):
        replay([[Call(post=(send(0),))]])


# ---- the executor's order ---------------------------------------------------------------------------------
NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def _layouts():
    for name in NAMES:
        for pp in (2, 3, 4, 6, 8, 16):
            if name == "dualpipe" and pp % 2:
                continue
            yield name, pp


@pytest.mark.parametrize("name,pp", list(_layouts()))
def test_the_executors_order_runs_under_nccl_rules_up_to_pp16(name, pp):
    schedule = make_schedule(name, pp)
    n = 2 * pp
    validate_schedule(schedule, n, p2p="channels")
    plans = [StepPlan(schedule, r, schedule.actions(r, n), n) for r in range(pp)]
    for strict in (False, True):
        out = replay([plan.program() for plan in plans], strict=strict)
        assert out.ok, out.deadlock or out.mismatched[:3]
        assert out.matched == sum(len(v) for plan in plans for v in plan.incoming.values())
    # one communicator per (producer, consumer, kind): only one rank sends on each, one kind travels
    for plan in plans:
        for channel in plan.channels():
            assert channel in channels(schedule) and plan.rank in channel[:2]


def _old_program(schedule, rank, n):
    """The executor before this change: an action's receives in one batch, each send its own batch, all on one
    communicator (the world group's), tags ignored."""
    calls, count = [], 0
    for action in schedule.actions(rank, n):
        ops = [Op(False, peer, "world", t) for part in action.parts()
               for peer, t in schedule.takes(rank, part, n) if peer != rank]
        if ops:
            calls.append(Call(post=tuple(ops)))
            calls.append(Call(wait=tuple(range(count, count + len(ops)))))
            count += len(ops)
        for part in action.parts():
            for peer, t in schedule.makes(rank, part, n):
                if peer != rank:
                    calls.append(Call(post=(Op(True, peer, "world", t),)))
                    count += 1
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_the_old_order_deadlocks_under_nccl_rules(name):
    for pp in (2, 4):
        schedule = make_schedule(name, pp)
        out = replay([_old_program(schedule, r, 2 * pp) for r in range(pp)])
        assert out.deadlock, (name, pp)


def test_a_schedule_needing_channels_the_grid_did_not_build_is_refused():
    one = make_schedule("1f1b", 4)
    built = dict.fromkeys(rank_channels(one, 1))
    check_channels(one, 1, built)
    with pytest.raises(ScheduleError, match=r"dualpipe over 4 pipeline ranks needs the p2p channel\(s\) 0->1 "
                                            r"gradients, 1->0 activations.*but the grid built 0->1 activations"):
        check_channels(make_schedule("dualpipe", 4), 1, built)


class _SwappedSends(OneFOneB):
    """1F1B with rank 0's first two forwards swapped: every rank check and the data flow pass, the activations
    channel 0 -> 1 does not keep its order."""

    def _actions(self, rank, n_micro):
        actions = super()._actions(rank, n_micro)
        if rank == 0:
            actions[0], actions[1] = actions[1], actions[0]
        return actions


def test_a_schedule_whose_channel_order_breaks_is_refused_before_training():
    bad = _SwappedSends(4)
    with pytest.raises(ScheduleError, match=r"link rank 0 -> rank 1 \(activations\) is not FIFO"):
        validate_schedule(bad, 8)
    assert bad.actions(0, 8)[:2] == [Action("F", 0, 1), Action("F", 0, 0)]
