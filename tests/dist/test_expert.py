"""The expert-parallel dispatcher (parallel/expert.py) against single-process MoE, in gloo processes on CPU.

Every rank builds the same seeded tokens, routing and full `RoutedExperts`; the reference runs all ranks'
tokens through the full expert set with autograd. The distributed run dispatches the rank's own tokens,
applies a `RoutedExperts` holding the rank's slice of the full weights, combines, and back-propagates the same
cotangent. Compared: the combined output and the gradients of h, of the gate weights and of the local expert
weights (against the matching slices of the reference), and the received rows, ids and weights (sorted by
source rank and token, as arrival order is not part of the contract).

Spawn 1 (4 processes): EP 4 with gpus_per_node 2 (two simulated nodes), flat and hierarchical, on uneven
routing (skewed expert loads, a rank that receives no rows, a rank that sends no tokens, unequal token counts);
EP 2 on subgroups [0, 2] and [1, 3] (group ranks differ from global ranks) with one rank per node; flat and
hierarchical must deliver identical rows; cross-node bytes equal the count of distinct remote destination
ranks (flat) or nodes (hierarchical) per token times the row bytes, so hierarchical crosses a node boundary
at most once per (token, destination node).
Spawn 2 (4 processes): the async handle path, a two-tensor payload hook (forward and combine backward), and a
real `Gate` with n_group = nodes feeding the dispatcher (no token reaches more than topk_group nodes).

Tolerances: fp32 with rtol 1e-5 / atol 1e-6 where summation order differs (reference vs EP, flat vs
hierarchical); exact equality where the same operations run in the same order (received rows, async vs sync,
identity vs lossless two-tensor packing).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.syncs import HostSyncCounter
from model.config import ModelConfig
from model.moe import Gate, RoutedExperts
from parallel.expert import ExpertParallelDispatcher
from tests.dist.conftest import run_distributed

E, DIM, INTER, K = 16, 16, 32, 4
TOL = dict(rtol=1e-5, atol=1e-6)


def _experts(n: int, seed: int) -> RoutedExperts:
    torch.manual_seed(seed)
    experts = RoutedExperts(n, DIM, INTER)
    for lin in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(lin.weight, std=0.3)  # O(1) outputs, so the tolerances mean something
    return experts


def _scenario(tokens: list[int], dead_ranks: tuple[int, ...], ep: int, seed: int):
    """Same on every rank: h, expert ids, gate weights and a cotangent for all ranks' tokens."""
    gen = torch.Generator().manual_seed(seed)
    n_all = sum(tokens)
    scores = torch.rand(n_all, E, generator=gen)
    scores[: n_all // 2, :3] += 2.0  # skew: half the tokens pick experts 0-2
    per_rank = E // ep
    for r in dead_ranks:  # these ranks' experts receive nothing
        scores[:, r * per_rank:(r + 1) * per_rank] = -1.0
    idx = scores.topk(K, dim=-1).indices  # (N_all, K)
    w = torch.rand(n_all, K, generator=gen) + 0.1
    h = torch.randn(n_all, DIM, generator=gen)
    g = torch.randn(n_all, DIM, generator=gen)
    return h, idx, w, g


def _reference(h, idx, w, g):
    full = _experts(E, 1)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = full(h, idx, w)
    (out * g).sum().backward()
    return out.detach(), h.grad, w.grad, full


def _run_ep(disp: ExpertParallelDispatcher, h, idx, w, g, full_ref: RoutedExperts):
    """Dispatch -> local experts -> combine -> backward on this rank's tokens; returns what the tests check."""
    ep_rank, per_rank = disp.rank, E // disp.ep
    local = _experts(per_rank, 1)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            full = getattr(full_ref, name).weight
            getattr(local, name).weight.copy_(full[ep_rank * per_rank:(ep_rank + 1) * per_rank])
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    syncs = [HostSyncCounter() for _ in range(4)]  # dispatch, experts, combine, backward
    with syncs[0]:
        arrived = disp.dispatch(h, idx, w)
    rows, ids, rw, layout = arrived.rows, arrived.expert_ids, arrived.weights, arrived.layout
    with syncs[1]:
        y = local(rows, ids, rw, expert_counts=arrived.expert_counts)
    with syncs[2]:
        out = disp.combine(y, layout)
    with syncs[3]:
        (out * g).sum().backward()
    grads = {n: getattr(local, n).weight.grad for n in ("w1", "w2", "w3")}
    return dict(out=out.detach(), h_grad=h.grad, w_grad=w.grad, rows=rows.detach(), ids=ids, rw=rw.detach(),
                layout=layout, expert_grads=grads, expert_counts=arrived.expert_counts,
                syncs=[c.total for c in syncs])


def _check_against_reference(res: dict, ref: tuple, offsets: list[int], ep_rank: int, ep: int, h_all, idx_all,
                             w_all, what: str) -> None:
    ref_out, ref_h_grad, ref_w_grad, full = ref
    lo, hi = offsets[ep_rank], offsets[ep_rank + 1]
    torch.testing.assert_close(res["out"], ref_out[lo:hi], **TOL, msg=f"{what}: output")
    torch.testing.assert_close(res["h_grad"], ref_h_grad[lo:hi], **TOL, msg=f"{what}: grad h")
    torch.testing.assert_close(res["w_grad"], ref_w_grad[lo:hi], **TOL, msg=f"{what}: grad weights")
    per_rank = E // ep
    for name, grad in res["expert_grads"].items():
        ref_grad = getattr(full, name).weight.grad[ep_rank * per_rank:(ep_rank + 1) * per_rank]
        torch.testing.assert_close(grad, ref_grad, **TOL, msg=f"{what}: grad experts.{name}")

    # host syncs (core/syncs.py): one per hop of the dispatch (its counts exchange, which also sizes the expert
    # GEMMs: the counts it gives are those of the received ids), none in the experts, the combine or the backward
    assert res["syncs"] == [len(res["layout"].hops), 0, 0, 0], f"{what}: host syncs {res['syncs']}"
    received = res["ids"][res["ids"] >= 0]
    assert res["expert_counts"] == torch.bincount(received, minlength=per_rank).tolist(), f"{what}: expert counts"

    # received rows: one per (token, this rank) for every token with an expert here, by (source, token)
    layout = res["layout"]
    order = torch.argsort(layout.src_rank * (1 << 32) + layout.src_token)
    src_rank, src_token = layout.src_rank[order], layout.src_token[order]
    mine = (idx_all // per_rank == ep_rank)  # (N_all, K)
    expect = mine.any(1).nonzero().squeeze(1)  # global token ids, ascending = by (source rank, token)
    src_of = torch.bucketize(expect, torch.tensor(offsets[1:]), right=True)
    assert torch.equal(src_rank, src_of), f"{what}: source ranks of received rows"
    assert torch.equal(src_token, expect - torch.tensor(offsets)[src_of]), f"{what}: source tokens"
    assert torch.equal(res["rows"][order], h_all[expect]), f"{what}: row payload"
    exp_ids = torch.where(mine[expect], idx_all[expect] - ep_rank * per_rank, -1)
    assert torch.equal(res["ids"][order], exp_ids), f"{what}: local ids"
    assert torch.equal(res["rw"][order], torch.where(mine[expect], w_all[expect], 0.0)), f"{what}: row weights"


def _expected_cross_bytes(idx: torch.Tensor, ep_rank: int, per_rank: int, gpn: int, hierarchical: bool) -> int:
    """Payload bytes this rank must send to other nodes: distinct remote destination ranks (flat) or nodes
    (hierarchical) per token, times the fp32 row size."""
    unit = per_rank * gpn if hierarchical else per_rank
    n_units = E // unit
    remote = idx // (per_rank * gpn) != ep_rank // gpn  # (N, K) slot's expert on another node
    hits = torch.zeros(idx.shape[0], n_units + 1, dtype=torch.bool)
    hits.scatter_(1, torch.where(remote, idx // unit, n_units), True)  # (N, units + 1), last = not remote
    return int(hits[:, :n_units].sum()) * DIM * 4


def _scenario_checks(rank: int, group, ep: int, gpn: int, tokens: list[int], dead: tuple[int, ...], seed: int,
                     what: str) -> None:
    ep_rank = dist.get_rank(group)
    h_all, idx_all, w_all, g_all = _scenario(tokens, dead, ep, seed)
    offsets = [sum(tokens[:r]) for r in range(ep + 1)]
    lo, hi = offsets[ep_rank], offsets[ep_rank + 1]
    ref = _reference(h_all, idx_all, w_all, g_all)
    results = {}
    for hierarchical in (False, True):
        disp = ExpertParallelDispatcher(group, E, gpus_per_node=gpn, hierarchical=hierarchical)
        res = _run_ep(disp, h_all[lo:hi], idx_all[lo:hi], w_all[lo:hi], g_all[lo:hi], ref[3])
        tag = f"{what} {'hierarchical' if hierarchical else 'flat'} (EP rank {ep_rank})"
        _check_against_reference(res, ref, offsets, ep_rank, ep, h_all, idx_all, w_all, tag)
        if ep_rank in dead:
            assert res["rows"].shape[0] == 0, f"{tag}: an idle rank receives no rows"
        stats = disp.stats()
        expect = _expected_cross_bytes(idx_all[lo:hi], ep_rank, E // ep, gpn, hierarchical)
        assert stats["cross_node_bytes"] == expect, f"{tag}: cross-node bytes {stats} vs {expect}"
        assert stats["tokens"] == hi - lo and stats["dispatch_rows"] == res["rows"].shape[0], tag
        assert stats["dispatches"] == 1 and disp.stats()["tokens"] == 0, f"{tag}: stats reset"
        results[hierarchical] = (res, stats)
    flat, hier = results[False][0], results[True][0]
    for key in ("rows", "ids", "rw"):  # hierarchical restores the flat row order: identical rows
        assert torch.equal(flat[key], hier[key]), f"{what}: flat vs hierarchical {key}"
    for key in ("out", "h_grad", "w_grad"):
        torch.testing.assert_close(flat[key], hier[key], **TOL, msg=f"{what}: flat vs hierarchical {key}")
    assert results[True][1]["cross_node_bytes"] <= results[False][1]["cross_node_bytes"]


def _reference_spawn(rank: int, world: int) -> None:
    torch.manual_seed(0)
    world_group = dist.group.WORLD
    # EP 4, two nodes of two: rank 3's experts idle (receives no rows), rank 1 sends no tokens
    _scenario_checks(rank, world_group, 4, 2, [24, 0, 40, 17], (3,), 0, "EP4 skewed")
    _scenario_checks(rank, world_group, 4, 2, [32, 32, 32, 32], (), 1, "EP4 even")
    # EP 2 on subgroups (group rank != global rank), one rank per node
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = groups[rank % 2]
    _scenario_checks(rank, mine, 2, 1, [30, 19], (), 2 + rank % 2, "EP2")
    _scenario_checks(rank, mine, 2, 1, [12, 26], (0,), 4, "EP2 one idle rank")


def test_dispatcher_matches_single_process_moe() -> None:
    run_distributed(_reference_spawn, 4)


def _second_communicator_spawn(rank: int, world: int) -> None:
    """The backward's exchanges run on `bwd_group` (the grid's ep_bwd), every forward exchange on the EP group,
    with bitwise the results of one group for both."""
    bwd = dist.new_group([0, 1, 2, 3])
    h_all, idx_all, w_all, g_all = _scenario([24, 8, 40, 17], (), 4, 5)
    lo, hi = sum([24, 8, 40, 17][:rank]), sum([24, 8, 40, 17][:rank + 1])
    full = _reference(h_all, idx_all, w_all, g_all)[3]
    args = (h_all[lo:hi], idx_all[lo:hi], w_all[lo:hi], g_all[lo:hi], full)
    original = dist.all_to_all_single
    for hierarchical in (False, True):
        one = _run_ep(ExpertParallelDispatcher(dist.group.WORLD, E, 2, hierarchical), *args)
        used = []

        def spy(*a, group=None, **k):
            used.append("bwd" if group is bwd else "fwd" if group is dist.group.WORLD else group)
            return original(*a, group=group, **k)

        dist.all_to_all_single = spy
        try:
            two = _run_ep(ExpertParallelDispatcher(dist.group.WORLD, E, 2, hierarchical, bwd_group=bwd), *args)
        finally:
            dist.all_to_all_single = original
        n_fwd = used.count("fwd")
        assert n_fwd > 0 and used.count("bwd") > 0 and used == ["fwd"] * n_fwd + ["bwd"] * (len(used) - n_fwd), used
        for key in ("out", "h_grad", "w_grad", "rows"):
            assert torch.equal(one[key], two[key]), key
        for name, grad in one["expert_grads"].items():
            assert torch.equal(grad, two["expert_grads"][name]), name


def test_the_backward_exchanges_run_on_the_second_communicator() -> None:
    run_distributed(_second_communicator_spawn, 4)


class TwoTensorPayload:
    """Lossless two-tensor payload hook: the bf16 rounding as a uint8 view plus the fp32 remainder."""

    packs = 0

    def pack(self, rows: torch.Tensor) -> list[torch.Tensor]:
        self.packs += 1
        high = rows.to(torch.bfloat16)
        return [high.view(torch.uint8), rows - high.float()]  # (N, 2 dim) uint8, (N, dim) fp32

    def unpack(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return tensors[0].view(torch.bfloat16).float() + tensors[1], None


def _features_spawn(rank: int, world: int) -> None:
    ep, gpn = 4, 2
    tokens = [20, 33, 8, 27]
    h_all, idx_all, w_all, g_all = _scenario(tokens, (), ep, 5)
    offsets = [sum(tokens[:r]) for r in range(ep + 1)]
    lo, hi = offsets[rank], offsets[rank + 1]
    h, idx, w, g = h_all[lo:hi], idx_all[lo:hi], w_all[lo:hi], g_all[lo:hi]
    ref = _reference(h_all, idx_all, w_all, g_all)
    for hierarchical in (False, True):
        tag = "hierarchical" if hierarchical else "flat"
        sync = _run_ep(ExpertParallelDispatcher(None, E, gpn, hierarchical), h, idx, w, g, ref[3])

        # async handles: compute while the payload is in flight
        disp = ExpertParallelDispatcher(None, E, gpn, hierarchical)
        local = _experts(E // ep, 1)
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                getattr(local, name).weight.copy_(getattr(ref[3], name).weight[rank * (E // ep):(rank + 1) * (E // ep)])
        hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        handle = disp.dispatch_async(hx, idx, wx)
        busy = torch.randn(64, 64) @ torch.randn(64, 64)  # overlapped compute
        rows, ids, rw, layout, *_ = handle.wait()
        assert handle.wait()[0] is rows, f"{tag}: wait() is idempotent"
        handle = disp.combine_async(local(rows, ids, rw), layout)
        busy = busy @ busy
        out = handle.wait()
        (out * g).sum().backward()
        assert torch.equal(out, sync["out"]) and torch.equal(rows, sync["rows"]), f"{tag}: async forward"
        assert torch.equal(hx.grad, sync["h_grad"]) and torch.equal(wx.grad, sync["w_grad"]), f"{tag}: async grads"

        # two-tensor payload hook: lossless, so identical to the identity hook, forward and backward
        two = ExpertParallelDispatcher(None, E, gpn, hierarchical)
        two.payload = TwoTensorPayload()
        res = _run_ep(two, h, idx, w, g, ref[3])
        assert two.payload.packs == 2, f"{tag}: pack runs in dispatch and in combine backward"
        for key in ("out", "h_grad", "w_grad", "rows", "rw"):
            assert torch.equal(res[key], sync[key]), f"{tag}: two-tensor hook {key}"
        for name, grad in res["expert_grads"].items():
            assert torch.equal(grad, sync["expert_grads"][name]), f"{tag}: two-tensor hook grad {name}"
        bytes_fp32 = _expected_cross_bytes(idx, rank, E // ep, gpn, hierarchical)
        assert two.stats()["cross_node_bytes"] == bytes_fp32 // (4 * DIM) * (6 * DIM), f"{tag}: hook row bytes"

    # node-limited routing: a real Gate with n_group = nodes and topk_group = 1
    cfg = ModelConfig(dim=DIM, n_routed_experts=E, n_activated_experts=K, n_group=ep // gpn, topk_group=1)
    torch.manual_seed(7)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    x = torch.randn(64, DIM)
    for hierarchical in (False, True):
        disp = ExpertParallelDispatcher(None, E, gpn, hierarchical)
        _, gidx, gw = gate(x)
        layout = disp.dispatch(x, gidx, gw).layout
        reached = torch.zeros(world, 64, ep // gpn)  # (source rank, token, node)
        reached[layout.src_rank, layout.src_token, rank // gpn] = 1.0
        dist.all_reduce(reached)
        nodes_per_token = (reached > 0).sum(-1)  # (source rank, token)
        assert (nodes_per_token <= cfg.topk_group).all() and (nodes_per_token >= 1).all(), "token left its nodes"
        if hierarchical:  # one row per (token, remote node), and each token reaches one node
            remote_tokens = (gidx // (E // ep * gpn) != rank // gpn).any(1).sum()
            assert disp.stats()["cross_node_bytes"] == int(remote_tokens) * DIM * 4, "one crossing per token"

def test_async_payload_hook_and_node_limited_gate() -> None:
    run_distributed(_features_spawn, 4)
