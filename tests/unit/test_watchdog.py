"""The hang watchdog's pieces (trainer/watchdog.py) that the e2e test (tests/e2e/test_train_failure.py, a SIGSTOPped
rank) does not isolate: the flight recorder is switched on unless the user sized it, under either of torch's names;
the collective a rank waits in is the oldest one not completed, with its sequence number (p2p's for p2p) and its
group's description; and process groups carry descriptions that say their kind and ranks."""

from __future__ import annotations

from parallel.pipeline.p2p import group_desc
from trainer.watchdog import record_collectives, waiting_in


def test_the_recorder_is_switched_on_unless_the_user_sized_it():
    env: dict[str, str] = {}
    record_collectives(env)
    assert env == {"TORCH_FR_BUFFER_SIZE": "2000"}
    for mine in ({"TORCH_FR_BUFFER_SIZE": "0"}, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "50"}):
        env = dict(mine)
        record_collectives(env)
        assert env == mine


def _entry(record_id: int, name: str, retired: bool, pg: tuple[str, str], seq: int, p2p: bool = False) -> dict:
    return {"record_id": record_id, "profiling_name": name, "retired": retired, "process_group": pg,
            "time_created_ns": 1000 + record_id, "is_p2p": p2p, "collective_seq_id": 0 if p2p else seq,
            "p2p_seq_id": seq if p2p else 0}


def test_the_collective_waited_in_is_the_oldest_not_completed():
    entries = [_entry(0, "gloo:broadcast", True, ("0", "default_pg"), 1),
               _entry(1, "gloo:send", False, ("5", "p2p 0->1 [0,4]"), 7, p2p=True),
               _entry(2, "gloo:all_reduce", False, ("1", "dp[0,1]"), 21)]
    assert waiting_in(entries) == "gloo:send #7 of group p2p 0->1 [0,4]"
    assert waiting_in(entries[2:]) == "gloo:all_reduce #21 of group dp[0,1]"
    assert waiting_in([_entry(3, "nccl:all_gather", False, ("3", "undefined"), 2)]) == "nccl:all_gather #2 of group 3"
    assert waiting_in(entries[:1]) is None and waiting_in([]) is None


def test_groups_are_described_by_kind_and_ranks():
    assert group_desc("dp", [0, 2]) == "dp[0,2]"
    assert group_desc("ep", list(range(0, 128, 2))) == "ep[0,2,...,126] (64 ranks)"


def test_a_dump_that_blocks_does_not_keep_the_job_alive(tmp_path, monkeypatch, capsys):
    """The recorder's dump may wait on what the stuck collective holds: the watchdog gives it DUMP_TIMEOUT_S, then
    names the rank and ends the process without it (here the dump would finish only after 30 s, naming a file)."""
    import os
    import threading

    import trainer.watchdog as watchdog

    release, exits = threading.Event(), []
    monkeypatch.setattr(watchdog, "DUMP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(watchdog, "_dump_flight_recorder",
                        lambda run_dir, rank: (release.wait(30), ([tmp_path / "late"], "gloo:send #1"))[1])
    monkeypatch.setattr(os, "_exit", exits.append)
    try:
        watchdog.Watchdog(0, tmp_path, rank=3, step=7)._fire()
    finally:
        release.set()
    err = capsys.readouterr().err
    assert exits == [watchdog.EXIT_CODE] and "error (rank 3): no progress" in err and "in step 8" in err
    assert "late" not in err and "waiting in" not in err and (tmp_path / "hang.rank3.txt").is_file()
