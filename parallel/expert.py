"""Expert parallelism: the all-to-all token dispatcher and combiner (paper 3.2, "cross-node all-to-all").

`ExpertParallelDispatcher` has `model.moe.LocalDispatcher`'s interface, so a MoE layer does not know whether
its experts are local. The EP group's rank r owns the contiguous global experts [r E/EP, (r+1) E/EP).

Semantics (DeepEP's normal mode, on `torch.distributed.all_to_all_single`):
- dispatch sends one row per (token, destination rank), however many of the token's K experts live there.
  A rank receives its rows grouped by source rank in rank order, within a source in token order, with
  per-row local expert ids ([R, K], -1 where that slot's expert lives elsewhere) and weights ([R, K] fp32,
  0 where -1). Per-destination row counts are exchanged first, then the metadata (ids, weights, source
  rank and token, as int32), then the payload with uneven splits.
- combine sends each row's expert output (already weighted and summed over the rank's slots by
  `RoutedExperts`) back along the reverse path and sums the rows of every token, unweighted.
- autograd: dispatch backward is a combine of the row gradients (to h) plus the gradient of the row weights
  sent back to their (token, slot), so the gate keeps learning; combine backward is a dispatch of the
  output gradients reusing the saved layout.
- hierarchical mode (the paper's IB + NVLink scheme): hop 1 sends a token once to every destination node
  that holds any of its experts, to the rank with the sender's local index in that node (the only
  cross-node traffic); hop 2 forwards it inside the node to the ranks holding the experts. The final
  rows, ids and weights are the flat mode's (rows are reordered by (source rank, source token)); combine
  sums inside the node first and crosses nodes once per (token, node). Results equal flat mode up to float
  summation order. Node = EP-group rank // gpus_per_node. With one node or one rank per node the flat
  exchange already crosses each node boundary once per (token, node), and hierarchical mode runs it.

The dispatch-direction payload (forward dispatch and combine backward) goes through `pack(rows) -> list[Tensor]`
/ `unpack(tensors) -> (rows, packed)`, which use the `payload` given at construction when there is one
(fp8/recipe.py's FP8Payload: uint8 view + scales); relays forward packed rows without unpacking, and the dispatch
delivers the payload's own form of the rows as `Dispatched.packed` (the FP8 expert GEMM's operand). The combine
direction sends plain tensors.
`dispatch_async` / `combine_async` return a `CommHandle` whose `wait()` finishes the exchange: the caller
can compute while the payload is in flight (gloo runs it on its own threads). The count and metadata
exchanges of a dispatch are synchronous and small. The exchanges of the backward run inside autograd; between
launching and waiting they call `during_exchange` when it is set, which is where DualPipe's overlapped chunk runs
another micro-batch's forward (parallel/pipeline/overlap.py). With a simulated `fabric` (parallel/fabric.py) every
payload exchange, forward and backward, lasts at least its modelled duration on the cluster's links.

Two communicators. The exchanges of the backward (combine backward, dispatch backward) run on `bwd_group`, a
second group of the same EP ranks (the grid's `ep_bwd_group`), when one is given: on NCCL one communicator's
ops run in order on one stream, so with DualPipe's overlapped chunk a forward's count exchange on the same
communicator would queue behind the other micro-batch's backward payload; on its own communicator it does not.

`stats()` returns and resets totals since its last call: dispatch calls, rows received, tokens dispatched,
payload bytes sent to ranks on other nodes (forward dispatches only), for cross-node bytes per token, the
time spent waiting for payload exchanges (the all-to-all time not hidden behind compute) and their modelled time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from model.moe import Dispatched
from parallel.clock import Clock
from parallel.fabric import Fabric, LinkDelay


def expert_range(n_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """The global ids [start, end) of the routed experts that EP rank `ep_rank` owns."""
    per_rank = n_experts // ep_size
    return ep_rank * per_rank, (ep_rank + 1) * per_rank


def is_expert_param(name: str) -> bool:
    """Routed-expert parameters are sharded by EP (and reduced over expert-DP); all others are dense."""
    return ".experts." in name


class Payload(Protocol):
    """How dispatch-direction rows travel (fp8/recipe.py `FP8Payload`): `pack` rows [N, dim] into tensors whose
    dim 0 is the rows, `unpack` them back into (rows, the payload's own form of them)."""

    def pack(self, rows: torch.Tensor) -> list[torch.Tensor]: ...

    def unpack(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, object]: ...


Works = list  # list of torch.distributed Work objects in flight
Flow = Generator[Works, None, list[torch.Tensor]]


@dataclass
class Hop:
    """One all-to-all of a dispatch: send row i is row `index[i]` of the previous level (tokens for the first hop;
    hierarchical mode has two hops, across nodes then inside the node)."""

    index: torch.Tensor  # (S,) int64
    send: list[int]  # rows to each EP rank (sum S)
    recv: list[int]  # rows from each EP rank
    n_in: int  # rows at the previous level
    cross_node_rows: int  # rows of `send` that go to ranks on other nodes


@dataclass
class DispatchLayout:
    """What combine (and both backwards) need to retrace a dispatch; opaque to the model."""

    n_tokens: int
    hops: list[Hop]
    perm: torch.Tensor | None  # (R,) final rows = last hop's arrivals[perm]; None = arrival order
    local_ids: torch.Tensor  # (R, K) int64, -1 = expert not on this rank
    row_weights: torch.Tensor  # (R, K) fp32, 0 where local_ids == -1
    src_rank: torch.Tensor  # (R,) EP rank the row's token came from
    src_token: torch.Tensor  # (R,) the token's index on its source rank
    expert_counts: list[int]  # (row, slot) pairs received for each local expert (host: from the counts exchange)


class CommHandle:
    """An exchange in flight; `wait()` completes it (driving any later hop) and returns the result. The time
    spent in `wait()` (communication the caller did not hide behind compute) is counted on `clock` under `key()`:
    host time on the CPU, the compute stream's stall on CUDA (parallel/clock.py)."""

    def __init__(self, flow: Flow, finish: Callable[[list[torch.Tensor]], object], clock: Clock | None = None,
                 key: Callable[[], str] | None = None) -> None:
        self._flow, self._finish, self._clock, self._key = flow, finish, clock, key
        self._works = next(flow)  # launches the first hop now
        self._done, self._result = False, None

    def wait(self):
        if not self._done:
            start = self._clock.mark() if self._clock is not None else None
            while True:
                for work in self._works:
                    work.wait()
                try:
                    self._works = self._flow.send(None)
                except StopIteration as stop:
                    self._result = self._finish(stop.value)
                    break
            self._done, self._flow, self._works = True, None, []
            if self._clock is not None:
                self._clock.add(self._key(), start, self._clock.mark())
        return self._result


class _Dispatch(torch.autograd.Function):
    """(h, weights) -> (rows, row_weights); the exchange already ran, its results arrive in `box`."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weights: torch.Tensor, box: tuple):
        disp, layout, rows, row_weights = box
        ctx.disp, ctx.layout, ctx.dtypes = disp, layout, (h.dtype, weights.dtype)
        return rows, row_weights

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_row_weights: torch.Tensor):
        layout = ctx.layout
        grad_row_weights = grad_row_weights.float().masked_fill(layout.local_ids < 0, 0.0)  # (R, K)
        disp = ctx.disp
        grad_h, grad_w = disp._run(disp._combine_flow(layout, [grad_rows, grad_row_weights], disp.bwd_group))
        return grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None


class _Combine(torch.autograd.Function):
    """y [R, dim] -> out [N, dim]; the exchange already ran, its result arrives in `box`."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, box: tuple):
        disp, layout, out = box
        ctx.disp, ctx.layout, ctx.dtype = disp, layout, y.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        disp = ctx.disp
        rows, _ = disp.unpack(disp._run(disp._dispatch_flow(ctx.layout, disp.pack(grad.contiguous()),
                                                            disp.bwd_group)))
        return rows.to(ctx.dtype), None


class ExpertParallelDispatcher:
    """All-to-all dispatch/combine over an EP process group (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup | None, n_experts: int, gpus_per_node: int = 8,
                 hierarchical: bool = False, fabric: Fabric | None = None, payload: Payload | None = None,
                 device: torch.device | str = "cpu", bwd_group: dist.ProcessGroup | None = None) -> None:
        self.group, self.fabric = group, fabric
        # the backward's exchanges run on a second communicator of the same ranks (the grid's ep_bwd group): under
        # DualPipe's overlapped chunk a forward dispatch's small count exchange must not queue behind a backward
        # payload in flight on the same NCCL stream
        self.bwd_group = bwd_group if bwd_group is not None else group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.ep:
            raise ValueError(f"{n_experts} experts do not divide over an EP group of {self.ep}")
        self.n_experts, self.per_rank = n_experts, n_experts // self.ep
        self.gpus_per_node = min(gpus_per_node, self.ep)
        if self.ep % self.gpus_per_node:
            raise ValueError(f"EP group of {self.ep} is not a whole number of nodes of {gpus_per_node} ranks")
        self.n_nodes = self.ep // self.gpus_per_node
        self.node = self.rank // self.gpus_per_node
        self.hierarchical = hierarchical
        # with one node, or one rank per node, the flat exchange already sends a token once per node
        self._two_hop = hierarchical and self.n_nodes > 1 and self.gpus_per_node > 1
        self._stats = dict(dispatches=0, dispatch_rows=0, tokens=0, cross_node_bytes=0, link_s=0.0)
        # the exposed all-to-all: time spent waiting for payload exchanges, on `clock` under "a2a_wait:<tag>"; a
        # pipeline executor sets `tag` to the kind of the action running, to tell its waits apart
        self.clock, self.tag = Clock(device), ""
        self._waited_seen = 0.0  # the clock's a2a_wait total at the last stats()
        self.linked_s = 0.0  # running total (never reset) of `link_s`, for per-action accounting by an executor
        # called right after a backward exchange is launched and before it is waited for: a pipeline's overlapped
        # chunk runs another micro-batch's forward there (parallel/pipeline/overlap.py)
        self.during_exchange: Callable[[], None] | None = None
        self.payload = payload  # pack/unpack of the dispatch-direction rows (None: as they are)

    # ---- payload hook -------------------------------------------------------------------------------------
    def pack(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows [N, dim] -> tensors that travel; each must have the rows as dim 0 (relays select rows)."""
        return [rows] if self.payload is None else self.payload.pack(rows)

    def unpack(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, object]:
        """Inverse of `pack` on the received rows (the caller casts to its dtype), and the payload's own form of
        them (None without a payload)."""
        return (tensors[0], None) if self.payload is None else self.payload.unpack(tensors)

    # ---- public interface ---------------------------------------------------------------------------------
    def dispatch(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        """h [N, dim], idx [N, K] global expert ids, weights [N, K] -> a `Dispatched`: rows [R, dim], local ids
        [R, K], row weights [R, K] fp32, the layout, the payload's form of the rows."""
        return self.dispatch_async(h, idx, weights).wait()

    def combine(self, y: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
        """y [R, dim] (expert outputs per received row) -> [N, dim] summed per source token."""
        return self.combine_async(y, layout).wait()

    def dispatch_async(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> CommHandle:
        """Exchange counts and metadata now, start the payload; `wait()` returns what `dispatch` does."""
        layout = self._plan(idx, weights)
        packed = [t.contiguous() for t in self.pack(h.detach())]
        row_bytes = sum(t.element_size() * math.prod(t.shape[1:]) for t in packed)
        cross_rows = sum(s.cross_node_rows for s in layout.hops)
        self._stats["dispatches"] += 1
        self._stats["dispatch_rows"] += layout.local_ids.shape[0]
        self._stats["tokens"] += layout.n_tokens
        self._stats["cross_node_bytes"] += cross_rows * row_bytes

        def finish(tensors: list[torch.Tensor]) -> Dispatched:
            unpacked, packed = self.unpack(tensors)
            rows, row_weights = _Dispatch.apply(h, weights, (self, layout, unpacked.to(h.dtype),
                                                             layout.row_weights.clone()))
            return Dispatched(rows, layout.local_ids, row_weights, layout, packed, layout.expert_counts)

        return CommHandle(self._dispatch_flow(layout, packed, self.group), finish, self.clock, self._wait_key)

    def combine_async(self, y: torch.Tensor, layout: DispatchLayout) -> CommHandle:
        """Start sending y back; `wait()` returns what `combine` does."""
        def finish(tensors: list[torch.Tensor]) -> torch.Tensor:
            return _Combine.apply(y, (self, layout, tensors[0].to(y.dtype)))

        return CommHandle(self._combine_flow(layout, [y.detach()], self.group), finish, self.clock, self._wait_key)

    def stats(self) -> dict[str, float]:
        """Totals since the last call (then reset): dispatches, dispatch_rows, tokens, cross_node_bytes, wait_s,
        the seconds spent waiting for payload exchanges (forward and backward): the exposed all-to-all, and
        link_s, the simulated fabric's modelled seconds of those exchanges (0 without a fabric)."""
        out = dict(self._stats)
        self._stats = dict.fromkeys(out, 0)
        waited = sum(v for k, v in self.clock.totals().items() if k.startswith("a2a_wait:"))
        out["wait_s"], self._waited_seen = waited - self._waited_seen, waited
        return out

    def _wait_key(self) -> str:
        return f"a2a_wait:{self.tag}"

    # ---- layout (counts + metadata) -----------------------------------------------------------------------
    # Host syncs: one per hop (the counts exchange's copy to the host, which gives the send and receive sizes and,
    # on the last hop, the rows per local expert); the pairs are materialised on the device from those sizes.
    def _plan(self, idx: torch.Tensor, weights: torch.Tensor) -> DispatchLayout:
        n, k = idx.shape
        idx, dev = idx.long(), idx.device
        w_bits = weights.detach().float().contiguous().view(torch.int32)  # (N, K) fp32 bits
        src = torch.stack([torch.full((n,), self.rank, dtype=torch.int32, device=dev),
                           torch.arange(n, dtype=torch.int32, device=dev)], 1)  # (N, 2) source rank, token
        hops = []
        if self._two_hop:
            # hop 1: one row per (token, destination node), to the rank with our local index there
            per_node = self.per_rank * self.gpus_per_node
            node_of = idx // per_node  # (N, K)
            hit = _hits(node_of, self.n_nodes)  # (N, nodes)
            relay = torch.arange(self.n_nodes, device=dev) * self.gpus_per_node + self.rank % self.gpus_per_node
            rows = torch.zeros(self.ep, dtype=torch.long, device=dev).index_add_(0, relay, hit.sum(0))
            send_l, recv_l, _ = self._exchange_counts(rows[:, None])
            node, tok1 = _pairs(hit, sum(send_l))  # (S1,) sorted by node, then token
            here = node_of[tok1] == node[:, None]  # (S1, K)
            meta = torch.cat([torch.where(here, idx[tok1], -1).int(), w_bits[tok1].masked_fill(~here, 0),
                              src[tok1]], 1)  # (S1, 2K+2): global ids, weight bits, source
            hop1, meta = self._exchange_meta(tok1, send_l, recv_l, meta, n)
            # hop 2 (inside the node): one row per (received row, rank holding any of its experts)
            gid = meta[:, :k].long()  # (R1, K), -1 = expert on another node
            hops.append(hop1)
            dest_of = torch.where(gid >= 0, gid // self.per_rank, self.ep)  # (R1, K), ep = nowhere
            ids, row_w, src = gid, meta[:, k:2 * k], meta[:, 2 * k:]
            n_in = meta.shape[0]
        else:
            dest_of, ids, row_w, n_in = idx // self.per_rank, idx, w_bits, n
        hit = _hits(dest_of, self.ep)  # (n_in, ep)
        slots = torch.where(ids >= 0, ids, self.n_experts).flatten()  # every (row, slot) to one expert, or nowhere
        per_expert = torch.zeros(self.n_experts + 1, dtype=torch.long, device=dev).index_add_(
            0, slots, torch.ones_like(slots))[:-1].view(self.ep, self.per_rank)  # (ep, E/EP) slots to each expert
        send_l, recv_l, received = self._exchange_counts(torch.cat([hit.sum(0)[:, None], per_expert], 1))
        expert_counts = [sum(row[1 + e] for row in received) for e in range(self.per_rank)]
        dest, row = _pairs(hit, sum(send_l))  # (S,) sorted by destination rank, then row
        here = dest_of[row] == dest[:, None]  # (S, K)
        local = torch.where(here, ids[row] - dest[:, None] * self.per_rank, -1).int()
        meta = torch.cat([local, row_w[row].masked_fill(~here, 0), src[row]], 1)  # (S, 2K+2)
        hop, meta = self._exchange_meta(row, send_l, recv_l, meta, n_in)
        hops.append(hop)
        src_rank, src_token = meta[:, 2 * k].long(), meta[:, 2 * k + 1].long()  # (R,)
        perm = None
        if self._two_hop:  # arrivals are grouped by relay: restore (source rank, token) order
            perm = torch.argsort(src_rank * (1 << 32) + src_token)
            meta, src_rank, src_token = meta[perm], src_rank[perm], src_token[perm]
        return DispatchLayout(n_tokens=n, hops=hops, perm=perm, local_ids=meta[:, :k].long(),
                              row_weights=meta[:, k:2 * k].contiguous().view(torch.float32),
                              src_rank=src_rank, src_token=src_token, expert_counts=expert_counts)

    def _exchange_counts(self, counts: torch.Tensor) -> tuple[list[int], list[int], list[list[int]]]:
        """All-to-all of per-destination counts [ep, c] (column 0: rows; then anything else per destination), and
        the one copy of what was sent and received to the host: (rows sent to each rank, rows received from
        each, the received count rows)."""
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        both = torch.cat([counts, recv]).tolist()  # the hop's one host sync
        sent, received = both[:self.ep], both[self.ep:]
        return [r[0] for r in sent], [r[0] for r in received], received

    def _exchange_meta(self, index: torch.Tensor, send_l: list[int], recv_l: list[int], meta: torch.Tensor,
                       n_in: int) -> tuple[Hop, torch.Tensor]:
        """Metadata exchange for send rows `index` (sorted by destination), `send_l` of them to each rank."""
        meta_in = meta.new_empty((sum(recv_l), meta.shape[1]))
        dist.all_to_all_single(meta_in, meta.contiguous(), recv_l, send_l, group=self.group)
        cross = sum(c for r, c in enumerate(send_l) if r // self.gpus_per_node != self.node)
        return Hop(index=index, send=send_l, recv=recv_l, n_in=n_in, cross_node_rows=cross), meta_in

    # ---- payload flows (generators yielding the works in flight of each hop) ----------------------------
    def _a2a(self, tensors: list[torch.Tensor], send: list[int], recv: list[int], group: dist.ProcessGroup | None):
        outs, works = [], []
        for t in tensors:
            out = t.new_empty((sum(recv), *t.shape[1:]))
            works.append(dist.all_to_all_single(out, t.contiguous(), recv, send, group=group, async_op=True))
            outs.append(out)
        if self.fabric is not None:  # the simulated network: the exchange lasts what it would on the cluster
            row_bytes = sum(t.element_size() * math.prod(t.shape[1:]) for t in tensors)
            node = [r // self.gpus_per_node for r in range(self.ep)]
            intra = sum(n for r, n in enumerate(send) if r != self.rank and node[r] == self.node)
            inter = sum(n for r, n in enumerate(send) if node[r] != self.node)
            seconds = self.fabric.seconds(intra * row_bytes, inter * row_bytes)
            self._stats["link_s"] += seconds
            self.linked_s += seconds
            works.append(LinkDelay(seconds))
        return outs, works

    def _dispatch_flow(self, layout: DispatchLayout, tensors: list[torch.Tensor], group: dist.ProcessGroup | None
                       ) -> Flow:
        """Per-token tensors [N, ...] -> per-row tensors [R, ...] (forward hop by hop) over `group`."""
        for hop in layout.hops:
            tensors, works = self._a2a([t.index_select(0, hop.index) for t in tensors], hop.send, hop.recv, group)
            yield works
        if layout.perm is not None:
            tensors = [t.index_select(0, layout.perm) for t in tensors]
        return tensors

    def _combine_flow(self, layout: DispatchLayout, tensors: list[torch.Tensor], group: dist.ProcessGroup | None
                      ) -> Flow:
        """Per-row tensors [R, ...] -> per-token fp32 sums [N, ...] (hops reversed, relays sum first) over `group`."""
        dtypes = [t.dtype for t in tensors]
        if layout.perm is not None:  # back to the last hop's arrival order
            tensors = [torch.empty_like(t).index_copy_(0, layout.perm, t) for t in tensors]
        for i, hop in enumerate(reversed(layout.hops)):
            tensors, works = self._a2a(tensors, hop.recv, hop.send, group)
            yield works
            last = i == len(layout.hops) - 1
            tensors = [torch.zeros((hop.n_in, *t.shape[1:]), dtype=torch.float32, device=t.device)
                       .index_add_(0, hop.index, t.float()).to(torch.float32 if last else dt)
                       for t, dt in zip(tensors, dtypes)]  # relays send partial sums in the payload dtype
        return tensors

    def _run(self, flow: Flow) -> list[torch.Tensor]:
        """A backward exchange (autograd runs it in the middle of a backward): launched, then `during_exchange`
        (if set) computes something else, then waited for."""
        handle = CommHandle(flow, lambda tensors: tensors, self.clock, self._wait_key)
        if self.during_exchange is not None:
            self.during_exchange()
        return handle.wait()


def _hits(target: torch.Tensor, n_targets: int) -> torch.Tensor:
    """target [M, K] (values >= n_targets mean none) -> bool [M, n_targets]: whether row m goes to target t."""
    hit = torch.zeros(target.shape[0], n_targets + 1, dtype=torch.bool, device=target.device)
    return hit.scatter_(1, target.clamp(max=n_targets), True)[:, :n_targets]


def _pairs(hit: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, row) of every True of hit [M, T], sorted by target, then row, of which there are `count` (known on
    the host): what `hit.t().nonzero()` gives, without its host sync."""
    m = hit.shape[0]
    flat = hit.t().reshape(-1)
    slot = torch.where(flat, flat.cumsum(0) - 1, count)  # the i-th True goes to slot i, every False to slot `count`
    where = torch.empty(count + 1, dtype=torch.long, device=hit.device)
    where.scatter_(0, slot, torch.arange(flat.numel(), device=hit.device))
    return where[:count] // m, where[:count] % m
