"""The simulated fabric on real exchanges (gloo, 2 ranks on two simulated nodes): the expert all-to-all gives
bitwise the same rows with and without it, lasts at least its modelled link time, and hides behind compute
that runs while it is in flight (the wait after 80 ms of "compute" is a small part of a 50 ms exchange)."""

from __future__ import annotations

import time

import torch

from tests.dist.conftest import run_distributed

E, K, DIM, TOKENS = 8, 2, 64, 256


def _fabric_worker(rank: int, world: int) -> None:
    from parallel.expert import ExpertParallelDispatcher
    from parallel.fabric import Fabric

    g = torch.Generator().manual_seed(rank)
    h = torch.randn(TOKENS, DIM, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(TOKENS)])
    w = torch.rand(TOKENS, K, generator=g)
    plain = ExpertParallelDispatcher(None, E, gpus_per_node=1)
    rows, ids, rw, layout, *_ = plain.dispatch(h, idx, w)

    # the rows this rank sends to the other node, in bytes, set the link time to about 50 ms
    to_other = int(((idx // (E // world)) != rank).any(dim=1).sum())
    gbps = to_other * DIM * 4 / 0.05 / 1e9
    slow = ExpertParallelDispatcher(None, E, gpus_per_node=1, fabric=Fabric(intra_gbps=1.0, inter_gbps=gbps))
    modelled = Fabric(1.0, gbps).seconds(0, to_other * DIM * 4)
    assert abs(modelled - 0.05) < 1e-9

    t0 = time.perf_counter()
    rows2, ids2, rw2, *_ = slow.dispatch(h, idx, w)
    exposed = time.perf_counter() - t0
    assert torch.equal(rows, rows2) and torch.equal(ids, ids2) and torch.equal(rw, rw2)
    assert exposed >= 0.05, exposed  # nothing to overlap with: the whole link time is waited for
    assert slow.stats()["wait_s"] >= 0.05  # and the dispatcher reports it as exposed all-to-all time

    handle = slow.dispatch_async(h, idx, w)
    time.sleep(0.08)  # compute longer than the exchange
    t0 = time.perf_counter()
    rows3 = handle.wait()[0]
    hidden_wait = time.perf_counter() - t0
    assert torch.equal(rows3, rows)
    assert hidden_wait < 0.04, hidden_wait  # the link time passed during the compute
    assert slow.stats()["wait_s"] < 0.04


def test_fabric_delays_and_overlap_are_real():
    run_distributed(_fabric_worker, 2)
