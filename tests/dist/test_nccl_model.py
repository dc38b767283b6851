"""The pipeline's real p2p calls, recorded in gloo training runs, replayed under NCCL's rules
(parallel/pipeline/nccl_model.py; notes/nccl-and-gpu.md).

Eight gloo processes start once and train one step (with a validation pass) of a tiny model on each layout:
every schedule at PP=2 x DP=4 and PP=4 x DP=2 with EP=2, and DualPipe at PP=8, the dual schedules with the
overlapped chunk on and off. Every `isend`, `irecv` and `batch_isend_irecv` a rank makes is recorded (peer, group,
shape, dtype, a checksum of the payload: of a send when posted, of a receive after its wait), with every
`wait()`. The replay then runs each rank's calls as NCCL would: one FIFO per communicator, the k-th send meeting
the k-th receive whatever the tag, no buffering, the ops of one group call together; both with and without
"a wait orders every later op" (one compute stream), and with both of PyTorch's choices of communicator for a
lone op (the pair's own 2-rank communicator for groups made without a device, the group's with `device_id`;
a batch always uses the group's). It must not deadlock, and every matched pair must carry the same bytes. On
the executor before channels (sends as lone batches on the world group, tags telling the kinds apart) this
test fails with deadlocks at every layout and swapped tensors under the overlap.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist.conftest import run_distributed
from tests.dist.test_train_parallel import FAST

WORLD = 8
LAYOUTS = [  # (name, overrides)
    *[(f"pp2-{s}{o}", ["parallel.pp=2", f"parallel.schedule={s}", "parallel.ep=2", "parallel.gpus_per_node=4",
                       f"parallel.overlap={o == ''}", "model.n_layers=4"])
      for s in ("1f1b", "zb1p", "dualpipe", "dualpipev") for o in ("", "-sequential")
      if o == "" or s.startswith("dual")],
    *[(f"pp4-{s}{o}", ["parallel.pp=4", f"parallel.schedule={s}", "parallel.ep=2", "parallel.gpus_per_node=4",
                       f"parallel.overlap={o == ''}", f"model.n_layers={8 if s == 'dualpipev' else 4}"])
      for s in ("1f1b", "zb1p", "dualpipe", "dualpipev") for o in ("", "-sequential")
      if o == "" or s.startswith("dual")],
    *[(f"pp8-dualpipe{o}", ["parallel.pp=8", "parallel.schedule=dualpipe", f"parallel.overlap={o == ''}",
                            "model.n_layers=8"]) for o in ("", "-sequential")],
]


class Recorder:
    """Wraps torch.distributed's p2p functions (the package's names and the module's, which P2POp checks) and
    the works they return, recording one entry per call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []  # ("post", batch, [op dicts]) | ("wait", [op indices])
        self.ops: list[dict] = []
        self._inside = threading.local()
        import torch.distributed.distributed_c10d as c10d

        self._orig = {name: getattr(c10d, name) for name in ("isend", "irecv", "batch_isend_irecv")}
        self._wrapped = {"isend": self._lone(True), "irecv": self._lone(False)}
        for module in (dist, c10d):
            module.isend, module.irecv = self._wrapped["isend"], self._wrapped["irecv"]
            module.batch_isend_irecv = self._batch

    def reset(self) -> None:
        self.calls, self.ops = [], []

    @staticmethod
    def _group_name(group) -> str:
        g = group if group is not None else dist.distributed_c10d._get_default_group()
        return g.group_name

    def _op(self, send: bool, tensor: torch.Tensor, peer: int, group) -> int:
        self.ops.append({"send": send, "peer": peer, "group": self._group_name(group),
                         "meta": (tuple(tensor.shape), str(tensor.dtype)), "tensor": tensor,
                         "checksum": _checksum(tensor) if send else None})
        return len(self.ops) - 1

    def _lone(self, send: bool):
        orig = self._orig["isend" if send else "irecv"]

        def call(tensor, peer=None, group=None, tag=0, **kwargs):
            if getattr(self._inside, "batch", False):
                return orig(tensor, peer, group, tag, **kwargs)
            if peer is None:
                peer = dist.get_global_rank(group, kwargs["group_dst" if send else "group_src"])
            index = self._op(send, tensor, peer, group)
            self.calls.append(("post", False, [index]))
            return _Work(orig(tensor, peer, group, tag, **kwargs), self, [index])
        return call

    def _batch(self, p2p_ops):
        indices = [self._op(op.op is self._wrapped["isend"], op.tensor, op.peer, op.group) for op in p2p_ops]
        self.calls.append(("post", True, indices))
        self._inside.batch = True
        try:
            works = self._orig["batch_isend_irecv"](p2p_ops)
        finally:
            self._inside.batch = False
        if len(works) == len(indices):
            return [_Work(w, self, [i]) for w, i in zip(works, indices)]
        return [_Work(w, self, indices) for w in works]

    def waited(self, indices: list[int]) -> None:
        for i in indices:
            op = self.ops[i]
            if not op["send"] and op["checksum"] is None:
                op["checksum"] = _checksum(op["tensor"])
        self.calls.append(("wait", list(indices)))

    def dump(self, path: Path) -> None:
        for op in self.ops:
            if op["checksum"] is None:  # a receive never waited for: what it holds now
                op["checksum"] = _checksum(op["tensor"])
        ops = [{k: v for k, v in op.items() if k != "tensor"} for op in self.ops]
        path.write_bytes(pickle.dumps({"calls": self.calls, "ops": ops}))


class _Work:
    def __init__(self, work, recorder: Recorder, indices: list[int]) -> None:
        self._work, self._recorder, self._indices = work, recorder, indices

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs)
        self._recorder.waited(self._indices)
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def _checksum(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:12]


def _worker(rank: int, world: int, out_dir: str) -> None:
    from parallel.grid import ProcessGrid
    from tests.dist.test_train_parallel import config
    from trainer.train import train

    torch.set_num_threads(1)
    recorder = Recorder()
    for name, overrides in LAYOUTS:
        pp = int(overrides[0].split("=")[1])
        run = Path(out_dir) / name
        cfg = config(overrides + [f"data.cache_dir={Path(out_dir) / 'cache'}", "trainer.micro_batch_size=1",
                                  f"trainer.global_batch_size={2 * WORLD}", "trainer.max_steps=1",
                                  "trainer.eval_every=1", "trainer.eval_batches=1", f"trainer.run_dir={run}"], world)
        assert len(FAST) and cfg.parallel.pp == pp
        grid = ProcessGrid.build(cfg.parallel, cfg.trainer.device)
        recorder.reset()
        train(cfg, run, grid)
        dist.barrier()
        recorder.dump(Path(out_dir) / f"{name}.rank{rank}.pkl")
        for group in [*grid.groups.values(), *grid.channels.values()]:
            if group is not None:
                dist.destroy_process_group(group)


def _programs(records: list[dict], lone_on_pair: bool):
    """Each rank's calls as the NCCL model's (rank numbering: global ranks)."""
    from parallel.pipeline.nccl_model import Call, Op

    programs = []
    for rank, rec in enumerate(records):
        ops, calls, posted = rec["ops"], [], {}
        for kind, *rest in rec["calls"]:
            if kind == "post":
                batch, indices = rest
                made = []
                for i in indices:
                    op = ops[i]
                    comm = (op["group"], "all") if batch or not lone_on_pair else \
                        (op["group"], min(rank, op["peer"]), max(rank, op["peer"]))
                    made.append(Op(op["send"], op["peer"], comm, op["checksum"], op["meta"]))
                    posted[i] = len(posted)
                calls.append(Call(post=tuple(made)))
            else:
                calls.append(Call(wait=tuple(posted[i] for i in rest[0])))
        programs.append(calls)
    return programs


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nccl_model")
    run_distributed(_worker, WORLD, str(out), timeout=900)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, _ in LAYOUTS])
def test_recorded_p2p_runs_under_nccl_rules(recorded, name):
    from parallel.pipeline.nccl_model import replay

    records = [pickle.loads((recorded / f"{name}.rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    n_ops = sum(len(rec["ops"]) for rec in records)
    assert n_ops > 0 and sum(op["send"] for rec in records for op in rec["ops"]) * 2 == n_ops
    for lone_on_pair in (True, False):
        programs = _programs(records, lone_on_pair)
        for strict in (False, True):
            outcome = replay(programs, strict=strict)
            where = f"{name}, lone ops on {'pair' if lone_on_pair else 'group'} communicators, strict={strict}"
            assert outcome.deadlock is None, f"{where}: deadlock: {outcome.deadlock[:2000]}"
            assert not outcome.mismatched, f"{where}: {len(outcome.mismatched)} of {n_ops // 2} tensors meet the " \
                                           f"wrong receive, e.g. {outcome.mismatched[:3]}"
            assert outcome.matched == n_ops // 2
