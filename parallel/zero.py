"""ZeRO-1 distributed optimizer (paper 3.2, "ZeRO-1 data parallel"), after Megatron's distributed optimizer.

What is sharded: the optimizer state only. Every data-parallel rank keeps the full model and computes full
gradients; the fp32 master weights and the AdamW moments are split across the ranks, so each rank holds about
1/DP of them (paper 3.3 "Storage": fp32 masters, bf16 or fp32 moments).

Layout (Megatron conventions, /work/shared/notes/references.md):
- Parameters are bucketed into flat buffers per (parameter dtype, expert or dense, `bucket_key`: the pipeline's
  gradient group, the parameters whose gradients become final together and are summed over the same pipeline
  copies, parallel/grad_reduce.py). A buffer is padded to a
  multiple of its group's size and every rank of the group owns one contiguous shard of it, ignoring parameter
  boundaries. Dense buffers are sharded over the data-parallel group (DP ranks), routed-expert buffers over the
  expert-data-parallel group (the ranks that hold the same experts: DP / EP of them, strided in rank order).
- Each shard keeps an fp32 master copy of its slice of the parameters and the two moments in
  `cfg.moment_dtype`, and the list of (start, end, weight decay) runs that tell which elements are matrices
  (decayed) and which are vectors (not), the rule of `optim.adamw.weight_decay_of`.

One step:
1. the gradients live in one persistent fp32 flat buffer per bucket (`_Bucket.grads`): every parameter's
   gradient (`model.grads.grad_of`: its `main_grad`, or `.grad` for an fp32 parameter) is a view of it, so the
   backward accumulates straight into the buffer and the reductions use it in place, with no second copy of the
   gradients (Megatron's contiguous grad buffer). It is reduce-scattered (`reduce_scatter_single`, torch 2.13's
   name for reduce_scatter_tensor; gloo runs it for fp32 and bf16, as it does all_gather_single): each rank
   receives the summed gradient of its own shard. The reduction is done in fp32, not in the parameter dtype: the
   paper keeps weight gradients in fp32 (3.3), and a bf16 reduce-scatter would round every partial sum to 8
   significant bits. `zero_grad` zeroes the buffers in place.
2. the global gradient norm is computed from the reduced shards and the shards are clipped;
3. `optim.adamw.adamw_update` runs on the fp32 master shards (it is elementwise, so flat slices are fine);
4. the updated shards are rounded to the parameter dtype and all-gathered back into the parameters, each
   bucket's all-gather started as soon as its update is done (the next bucket's update runs while it travels).

With a pipeline, step 1 may already have run per bucket during the step's cool-down
(parallel/grad_reduce.py: `flat_grads` and `start_reduce_scatter` are its pieces); `grad_norm` reduces only
the buckets that are not.

Gradient averaging. The trainer's loss on rank r, L_r, is the mean over its local micro-batches; the global
objective is L = (1/DP) sum_r L_r. A dense weight is replicated, so dL/dw = (1/DP) sum_r dL_r/dw: pre-scale by
1/DP and sum over the DP group. A routed expert lives on one EP rank of each EP group; through the all-to-all its
gradient there already is sum_{r in that EP group} dL_r/dw. Its replicas (the expert-DP group) sit in the other
EP groups, which together cover every rank once, so the sum over expert-DP is sum_{all r} dL_r/dw, and dL/dw is
that sum times 1/DP, not 1/expert-DP size. Both buffers are therefore pre-scaled by 1/DP (experts additionally by
`grad_scale_expert`) and summed over their own group.

Gradient norm. Dense shards partition the dense buffers over DP; expert shards partition each EP rank's expert
buffer over its expert-DP group, and different EP ranks hold different experts, so the expert shards of all
EP x expert-DP = DP ranks partition all experts. Hence one all-reduce SUM of the local sum of squares over the DP
group counts every element of the model exactly once (with pp = 1). Pipeline stages hold different layers, so
with PP the sum also runs over `extra_group` (the pipeline group).

Checkpoints. The state is named with the keys of optim/optimizer.py (`master.<name>` for non-fp32
parameters, `exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`), so one checkpoint serves the single-process
AdamW and ZeRO with any DP size. `shards` returns what this rank holds, as ranges of each flattened parameter,
and `load_shards` reads back just this rank's ranges, so checkpoints are written and read by every rank in
parallel without gathering anything (trainer/shards.py). `full_state_dict` gathers whole tensors (for
tests and tools). Expert parameters are named and shaped as the model holds them: the LOCAL experts of this EP
rank ([E/EP, ...]); trainer/shards.py maps their ranges into the full expert tensors.

A parameter whose gradient is None counts as a zero gradient (its moments still decay and weight decay applies),
as in Megatron; `optim.adamw.AdamW` skips it instead. In training every trained parameter gets a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.config import torch_dtype
from model.grads import grad_of
from optim.adamw import adamw_update, weight_decay_of
from optim.config import OptimConfig
from optim.optimizer import Optimizer, Read, ShapeOf, grad_norm_sq, scale_grads_

# torch 2.13's names of reduce_scatter_tensor / all_gather_into_tensor, which it deprecates; the older names keep the
# code running on the torch that GPU images ship (2.11 on this project's lent machines)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Group:
    """A process group with its size and this rank's index; size 1 and no communication when `group` is None
    and torch.distributed is not initialised (single-process training)."""

    group: dist.ProcessGroup | None
    size: int
    rank: int

    @staticmethod
    def of(group: dist.ProcessGroup | None) -> _Group:
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return _Group(None, 1, 0)
        return _Group(group, dist.get_world_size(group), dist.get_rank(group))


@dataclass
class _Segment:
    """The part of one parameter that lies in this rank's shard: shard elements [lo, hi) hold the flattened
    parameter's elements [start, start + hi - lo)."""

    name: str
    lo: int
    hi: int
    start: int


@dataclass
class _Bucket:
    """One flat buffer: the parameters of one (dtype, expert or dense) class and this rank's shard of it."""

    dtype: torch.dtype
    expert: bool
    group: _Group
    names: list[str]
    offsets: list[int]  # start of each parameter in the flat buffer
    numel: int  # parameter elements, padding excluded
    shard_size: int
    segments: list[_Segment] = field(default_factory=list)
    runs: list[tuple[int, int, float]] = field(default_factory=list)  # (lo, hi, weight decay), padding excluded
    master: Tensor = field(default_factory=lambda: torch.empty(0, device="cpu"))  # set by _build_bucket
    exp_avg: Tensor = field(default_factory=lambda: torch.empty(0, device="cpu"))
    exp_avg_sq: Tensor = field(default_factory=lambda: torch.empty(0, device="cpu"))
    step: int = 0
    grads: Tensor = field(default_factory=lambda: torch.empty(0, device="cpu"))  # [padded] fp32, persistent
    grad_shard: Tensor | None = None
    key: Hashable = None  # the bucket_key its parameters share

    @property
    def shard_start(self) -> int:
        return self.group.rank * self.shard_size

    @property
    def padded(self) -> int:
        return self.shard_size * self.group.size


class ZeroOptimizer(Optimizer):
    """ZeRO-1 AdamW: fp32 master weights and moments sharded over data-parallel ranks (see the module docstring).

    `dp_group`: the data-parallel group (None: the default group, or no communication when torch.distributed is
    not initialised). `expert_dp_group`: the expert-data-parallel group of this rank (None: the same as
    `dp_group`, i.e. EP = 1). `is_expert(name)` tells routed-expert parameters (`parallel.expert.is_expert_param`).
    `grad_scale_expert` multiplies expert gradients on top of the 1/DP average (1.0 with the trainer's loss
    convention). `extra_group`: a further group the gradient norm is summed over (the pipeline group with PP).
    `norm_share(name)`: the fraction of a parameter's squared gradient this rank counts in the global norm (1 by
    default; 1/k for a parameter that k pipeline ranks hold, such as DualPipe's two copies of every stage).
    `force_collectives`: run the reduce-scatter, all-reduce and all-gather even over groups of one rank (the GPU
    smoke kit checks devices and dtypes on a one-rank NCCL group with it; the results are the same).
    `bucket_key(name)`: parameters with different keys go to different buckets (`_Bucket.key`; the pipeline's
    gradient groups); None: one bucket per dtype and kind.
    Every method that communicates (step, grad_norm, full_state_dict, the loads) must be called on all ranks.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig,
                 dp_group: dist.ProcessGroup | None, expert_dp_group: dist.ProcessGroup | None,
                 is_expert: Callable[[str], bool], grad_scale_expert: float = 1.0,
                 extra_group: dist.ProcessGroup | None = None,
                 norm_share: Callable[[str], float] | None = None, force_collectives: bool = False,
                 bucket_key: Callable[[str], Hashable] | None = None) -> None:
        super().__init__(named_params, cfg)
        self.dp = _Group.of(dp_group)
        self.expert_dp = _Group.of(expert_dp_group) if expert_dp_group is not None else self.dp
        self.extra = _Group.of(extra_group) if extra_group is not None else None
        if self.dp.size % self.expert_dp.size:
            raise ValueError(f"ZeroOptimizer: the expert-DP group size {self.expert_dp.size} must divide the DP "
                             f"size {self.dp.size} (DP = EP x expert-DP)")
        self.grad_scale_expert = grad_scale_expert
        self.force_collectives = force_collectives
        devices = {p.device for p in self.params.values()}
        if len(devices) > 1:
            raise ValueError(f"ZeroOptimizer: the parameters live on several devices {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")  # masters, moments and buffers live here
        classes: dict[tuple[torch.dtype, bool, Hashable], list[str]] = {}
        for name, p in self.params.items():
            key = bucket_key(name) if bucket_key is not None else None
            classes.setdefault((p.dtype, bool(is_expert(name)), key), []).append(name)
        self.buckets: list[_Bucket] = [self._build_bucket(dtype, expert, names, key)
                                       for (dtype, expert, key), names in classes.items()]
        # per shard element, the share of its square in the global norm; None when every share is 1
        self._norm_shares: list[Tensor | None] = [None] * len(self.buckets)
        if norm_share is not None:
            for i, b in enumerate(self.buckets):
                if all(norm_share(seg.name) == 1 for seg in b.segments):
                    continue
                shares = torch.ones(b.shard_size, dtype=torch.float32, device=self.device)
                for seg in b.segments:
                    shares[seg.lo:seg.hi] = norm_share(seg.name)
                self._norm_shares[i] = shares
        self._bucket_of = {name: b for b in self.buckets for name in b.names}
        self._attach_grads()

    @torch.no_grad()
    def _build_bucket(self, dtype: torch.dtype, expert: bool, names: list[str], key: Hashable = None) -> _Bucket:
        group = self.expert_dp if expert else self.dp
        offsets, numel = [], 0
        for name in names:
            offsets.append(numel)
            numel += self.params[name].numel()
        b = _Bucket(dtype, expert, group, names, offsets, numel, shard_size=max(1, math.ceil(numel / group.size)),
                    key=key)
        lo_shard, hi_shard = b.shard_start, b.shard_start + b.shard_size
        moment_dtype = torch_dtype(self.cfg.moment_dtype)
        dev = self.device
        b.master = torch.zeros(b.shard_size, dtype=torch.float32, device=dev)  # padding stays 0 (zero grad, update)
        b.grads = torch.zeros(b.padded, dtype=torch.float32, device=dev)
        b.exp_avg = torch.zeros(b.shard_size, dtype=moment_dtype, device=dev)
        b.exp_avg_sq = torch.zeros(b.shard_size, dtype=moment_dtype, device=dev)
        for name, off in zip(names, offsets):
            p = self.params[name]
            lo, hi = max(off, lo_shard), min(off + p.numel(), hi_shard)
            if lo >= hi:
                continue
            seg = _Segment(name, lo - lo_shard, hi - lo_shard, lo - off)
            b.segments.append(seg)
            b.master[seg.lo:seg.hi] = p.detach().reshape(-1)[seg.start:seg.start + hi - lo].float()
            wd = weight_decay_of(p, self.cfg)
            if b.runs and b.runs[-1][1] == seg.lo and b.runs[-1][2] == wd:
                b.runs[-1] = (b.runs[-1][0], seg.hi, wd)  # merge neighbours: fewer, longer update calls
            else:
                b.runs.append((seg.lo, seg.hi, wd))
        return b

    # ---- gradients ---------------------------------------------------------------------------------------------

    def _view(self, b: _Bucket, name: str) -> Tensor:
        p = self.params[name]
        off = b.offsets[b.names.index(name)]
        return b.grads[off:off + p.numel()].view(p.shape)

    def _attach(self, p: nn.Parameter, view: Tensor) -> None:
        """Make `view` the parameter's gradient: its `main_grad`, or `.grad` of an fp32 parameter. A low-precision
        parameter without `main_grad` (no `model.grads.attach_main_grads`) keeps its own `.grad`, copied into the
        buffer by `flat_grads`."""
        if hasattr(p, "main_grad"):
            p.main_grad = view
        elif p.dtype == torch.float32:
            p.grad = view

    def _attach_grads(self) -> None:
        """Point every parameter's gradient at its slice of its bucket's flat buffer."""
        for b in self.buckets:
            for name in b.names:
                self._attach(self.params[name], self._view(b, name))

    @torch.no_grad()
    def flat_grads(self, b: _Bucket) -> Tensor:
        """The bucket's flat fp32 gradient buffer, ready to be reduced in place (zeros in the padding). A gradient
        that is not its view (one a caller set instead of accumulating into it) is copied in and the view
        re-attached; None counts as zero."""
        for name in b.names:
            p, view = self.params[name], self._view(b, name)
            g = grad_of(p)
            if g is None or g.data_ptr() != view.data_ptr():
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
                self._attach(p, view)
        return b.grads

    @torch.no_grad()
    def start_reduce_scatter(self, b: _Bucket, flat: Tensor) -> dist.Work | None:
        """Average `flat` (the bucket's summed gradients) as the module docstring derives and start its
        reduce-scatter into `b.grad_shard`; the work to wait for (None: nothing to reduce over one rank)."""
        scale = (self.grad_scale_expert if b.expert else 1.0) / self.dp.size
        if scale != 1.0:  # keeps DP = 1 bitwise equal to the replicated optimizer
            flat.mul_(scale)
        if b.group.size == 1 and not self.force_collectives:
            b.grad_shard = flat
            return None
        b.grad_shard = torch.empty(b.shard_size, dtype=torch.float32, device=self.device)
        return _reduce_scatter(b.grad_shard, flat, op=dist.ReduceOp.SUM, group=b.group.group, async_op=True)

    @torch.no_grad()
    def _reduce_grads(self) -> None:
        """Reduce-scatter the gradient of every bucket not reduced yet into this rank's fp32 shard."""
        for b in self.buckets:
            if b.grad_shard is None:
                work = self.start_reduce_scatter(b, self.flat_grads(b))
                if work is not None:
                    work.wait()

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """Global L2 norm (fp32, 0-d) of the averaged gradients, from the reduced shards (reduce-scattering them
        first if this step has not yet). Padding holds zeros, so it adds nothing."""
        if any(b.grad_shard is None for b in self.buckets):
            self._reduce_grads()
        sq = grad_norm_sq([b.grad_shard if s is None else b.grad_shard * s.sqrt()
                           for b, s in zip(self.buckets, self._norm_shares)])
        # Dense and expert shards both partition their elements over the DP group (see the module docstring).
        if self.dp.size > 1 or self.force_collectives:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.dp.group)
        if self.extra is not None and (self.extra.size > 1 or self.force_collectives):
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.extra.group)
        return sq.sqrt()

    @torch.no_grad()
    def step(self, lr: float, max_norm: float = 0.0) -> float:
        """Reduce the gradients, clip them at `max_norm` (0 = no clip), update the shards with AdamW and gather
        the parameters. Returns the gradient norm before clipping; a non-finite norm skips the update (the
        parameters and the state stay untouched) and is returned as it is."""
        if max_norm < 0:
            raise ValueError(f"ZeroOptimizer.step: max_norm must be >= 0 (0 = no clipping), got {max_norm}")
        norm = self.grad_norm()
        value = float(norm)  # the step's one host sync
        try:
            if not math.isfinite(value):
                return value
            if max_norm > 0:
                scale_grads_([b.grad_shard for b in self.buckets], norm, max_norm)  # as clip_grad_norm_ (and torch)
            gathers = []
            for b in self.buckets:
                b.step += 1
                for lo, hi, wd in b.runs:
                    adamw_update(b.master[lo:hi], b.grad_shard[lo:hi], b.exp_avg[lo:hi], b.exp_avg_sq[lo:hi],
                                 b.step, lr, self.cfg, wd)
                gathers.append(self._start_gather(b))  # travels while the next bucket updates
            for gathered in gathers:
                self._finish_gather(*gathered)
        finally:
            for b in self.buckets:
                b.grad_shard = None
        return value

    @torch.no_grad()
    def _gather_params(self, buckets: list[_Bucket] | None = None) -> None:
        """Round the master shards to the parameter dtype, all-gather them and write them into the parameters."""
        for b, full, work in [self._start_gather(b) for b in (self.buckets if buckets is None else buckets)]:
            self._finish_gather(b, full, work)

    def _start_gather(self, b: _Bucket) -> tuple[_Bucket, Tensor, dist.Work | None]:
        shard = b.master.to(b.dtype)
        if b.group.size == 1 and not self.force_collectives:
            return b, shard, None
        full = torch.empty(b.padded, dtype=b.dtype, device=self.device)
        return b, full, _all_gather(full, shard, group=b.group.group, async_op=True)

    def _finish_gather(self, b: _Bucket, full: Tensor, work: dist.Work | None) -> None:
        if work is not None:
            work.wait()
        for name, off in zip(b.names, b.offsets):
            p = self.params[name]
            p.copy_(full[off:off + p.numel()].view(p.shape))

    def zero_grad(self) -> None:
        """Zero the flat gradient buffers in place (the parameters' gradients stay views of them)."""
        for b in self.buckets:
            b.grads.zero_()
            b.grad_shard = None  # a step skipped after grad_norm() must not leave its reduced shards to the next
        for p in self.params.values():
            if not hasattr(p, "main_grad") and p.dtype != torch.float32:
                p.grad = None  # keeps its own .grad (see `_attach`)
        self._attach_grads()

    # ---- memory ------------------------------------------------------------------------------------------------

    def grad_buffer_bytes(self) -> int:
        """Bytes of this rank's persistent fp32 gradient buffers (every parameter held, padding included)."""
        return sum(b.grads.nbytes for b in self.buckets)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: fp32 master shards and both moment shards (padding included;
        the gradient buffers are `grad_buffer_bytes`)."""
        return sum(t.nbytes for b in self.buckets for t in (b.master, b.exp_avg, b.exp_avg_sq))

    # ---- checkpoints: full per-parameter tensors (optim.adamw.AdamW's keys) --------------------------------

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """`optim.adamw.AdamW.state_dict()`'s keys and shapes: `master.<name>` (non-fp32 parameters only),
        `exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`, gathered over each bucket's group (copies).
        Expert entries are this EP rank's local experts, shaped as the model's parameter; assemble them over EP
        over the EP group yourself (tests do). Collective: every rank of the DP group must call it."""
        gathered: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for i, b in enumerate(self.buckets):
            gathered[i] = tuple(self._gather(b, t) for t in (b.master, b.exp_avg, b.exp_avg_sq))
        index = {id(b): i for i, b in enumerate(self.buckets)}
        out: dict[str, Tensor] = {}
        for name, p in self.params.items():
            b = self._bucket_of[name]
            off = b.offsets[b.names.index(name)]
            master, exp_avg, exp_avg_sq = (t[off:off + p.numel()].view(p.shape).clone()
                                           for t in gathered[index[id(b)]])
            if p.dtype != torch.float32:
                out[f"master.{name}"] = master
            out[f"exp_avg.{name}"] = exp_avg
            out[f"exp_avg_sq.{name}"] = exp_avg_sq
            out[f"step.{name}"] = torch.tensor(b.step, dtype=torch.int64, device="cpu")
        return out

    @staticmethod
    def _gather(b: _Bucket, shard: Tensor) -> Tensor:
        if b.group.size == 1:
            return shard
        full = torch.empty(b.padded, dtype=shard.dtype, device=shard.device)
        _all_gather(full, shard, group=b.group.group)
        return full

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load full per-parameter tensors (a `full_state_dict()` or `optim.adamw.AdamW.state_dict()`, from any
        DP size), keeping this rank's shard. See `load_shards`."""
        self.load_shards({k: t.shape for k, t in state.items()}, lambda key, a, z: state[key].reshape(-1)[a:z])

    @staticmethod
    def _bucket_step(b: _Bucket, steps: dict[str, int]) -> int:
        """ZeRO counts steps per buffer: all parameters of a buffer must carry the same count."""
        values = set(steps.values())
        if len(values) != 1:
            raise ValueError(f"optimizer state has different step counts {sorted(values)} within one ZeRO buffer "
                             f"({b.dtype}, {'expert' if b.expert else 'dense'}): "
                             + ", ".join(f"{n}={s}" for n, s in list(steps.items())[:10])
                             + "; ZeRO keeps one step count per buffer, so every parameter must have taken the "
                             "same number of steps")
        return values.pop() if values else 0

    # ---- checkpoints: what this rank owns, written and read in place ------------------------------------------

    def owned(self) -> dict[str, tuple[int, int]]:
        """name -> the range [start, end) of the flattened parameter this rank's shards cover (parameters outside
        its shards are absent). Over the DP group (dense) or expert-DP group (experts) the ranges partition every
        parameter, so a checkpoint can give each element one writer."""
        return {seg.name: (seg.start, seg.start + seg.hi - seg.lo) for b in self.buckets for seg in b.segments}

    @torch.no_grad()
    def shards(self) -> dict[str, tuple[int, Tensor]]:
        """This rank's optimizer state under `full_state_dict`'s keys, each as (start, 1-D copy of the elements
        [start, start + n) of the flattened tensor); `step.<name>` entries are whole. No communication."""
        out: dict[str, tuple[int, Tensor]] = {}
        for b in self.buckets:
            for seg in b.segments:
                if self.params[seg.name].dtype != torch.float32:
                    out[f"master.{seg.name}"] = (seg.start, b.master[seg.lo:seg.hi].clone())
                out[f"exp_avg.{seg.name}"] = (seg.start, b.exp_avg[seg.lo:seg.hi].clone())
                out[f"exp_avg_sq.{seg.name}"] = (seg.start, b.exp_avg_sq[seg.lo:seg.hi].clone())
            for name in b.names:
                out[f"step.{name}"] = (0, torch.tensor([b.step], dtype=torch.int64, device="cpu"))
        return out

    @torch.no_grad()
    def load_shards(self, shapes: ShapeOf, read: Read) -> None:
        """Load the state saved under `full_state_dict`'s keys by any layout: `shapes` gives every saved key's
        (local) shape, `read(key, start, end)` the elements [start, end) of that flattened tensor. Each rank reads
        only its own shard ranges. The masters of fp32 parameters are the parameters themselves (as in AdamW):
        load the model weights first. Names and shapes are checked before anything is written. Collective (the
        final parameter gather)."""
        self.check_state(shapes)
        steps = {id(b): self._bucket_step(b, {name: int(read(f"step.{name}", 0, 1)[0]) for name in b.names})
                 for b in self.buckets}
        for b in self.buckets:
            b.step = steps[id(b)]
            for seg in b.segments:
                p = self.params[seg.name]
                a, z = seg.start, seg.start + seg.hi - seg.lo
                master = read(f"master.{seg.name}", a, z) if p.dtype != torch.float32 else p.detach().reshape(-1)[a:z]
                b.master[seg.lo:seg.hi] = master.float()
                b.exp_avg[seg.lo:seg.hi] = read(f"exp_avg.{seg.name}", a, z)
                b.exp_avg_sq[seg.lo:seg.hi] = read(f"exp_avg_sq.{seg.name}", a, z)
        self._gather_params()

