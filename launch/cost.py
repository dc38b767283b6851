"""The cost model behind `hai-plan` (launch/plan.py): what a config costs on a cluster before anything runs, as
pure functions of the model config, the grid and the cluster.

1. Memory per pipeline rank (`rank_memory`): compute weights, fp32 gradients, ZeRO-1 optimizer shards, the
   activations of the micro-batches in flight, a runtime reserve.
2. Expert all-to-all per MoE layer and micro-batch (`all_to_all`): InfiniBand and NVLink bytes and time under
   node-limited routing (paper 2.1.2, 3.2.2).
3. Time (`stage_costs`, `step_time`): chunk costs from FLOPs, the schedule's bubble (Table 2), the step.

Everything is an estimate from shapes and FLOP counts; each docstring says what it counts and what it leaves
out. Units: bytes, FLOPs, seconds; GB = 1e9 bytes (the conservative reading of an "80 GB" GPU).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields

import torch

from core.config import ConfigError
from model import flops
from model.config import ModelConfig
from model.linear import GroupedLinear, Linear
from model.moe import Gate
from model.transformer import Transformer
from parallel.expert import is_expert_param
from parallel.pipeline.action import Action
from parallel.pipeline.schedule import Schedule, make_schedule
from parallel.pipeline.simulate import Costs, formula_bubble, simulate
from parallel.pipeline.stage import StageSpec, holders, part_of, rank_stages, split_layers
from parallel.pipeline.validate import peak_activations

GB = 1e9
FP8_ACT = 1 + 4 / 128  # E4M3 byte + one fp32 scale per 1x128 tile (paper 3.3: activations, dispatch)
FP8_WEIGHT = 1 + 4 / (128 * 128)  # E4M3 byte + one fp32 scale per 128x128 block (weights)
E5M6_ACT = 1.5 + 4 / 128  # the custom 12-bit format of the input of the Linear after attention (paper 3.3.4)
BF16, FP32 = 2, 4
OPTIMIZER_BYTES = FP32 + 2 * BF16  # fp32 master + AdamW moments in bf16 (paper 3.3), sharded by ZeRO-1


def _field(doc: str):
    return field(metadata={"doc": doc})


@dataclass(frozen=True)
class Cluster:
    """A GPU cluster (configs/cluster/*.yaml, every field required); `doc` metadata is each field's help."""

    gpus: int = _field("GPUs in the job: the world size")
    gpus_per_node: int = _field("GPUs per node, joined by NVLink")
    gpu_memory_gb: float = _field("memory per GPU, GB (1e9 bytes)")
    reserved_gb: float = _field("GB per GPU not available to the model: CUDA context, NCCL/DeepEP buffers, "
                                "allocator slack")
    peak_tflops_bf16: float = _field("dense BF16 tensor-core peak per GPU, TFLOP/s")
    peak_tflops_fp8: float = _field("dense FP8 tensor-core peak per GPU, TFLOP/s")
    nvlink_gbps: float = _field("GB/s (gigabytes) per GPU inside a node, as achieved (paper 3.2.2: 160 on H800)")
    ib_gbps: float = _field("GB/s (gigabytes) per GPU between nodes (paper 3.2.2: 50)")
    mfu: float = _field("fraction of the peak of a GEMM's precision the model FLOPs reach while a rank computes "
                        "(bubbles and exposed communication are priced apart, recomputation is inside it)")

    def validate(self) -> Cluster:
        for f in fields(self):
            if not getattr(self, f.name) > 0 and f.name != "reserved_gb":
                raise ConfigError(f"cluster.{f.name}: must be > 0, got {getattr(self, f.name)}")
        if self.reserved_gb < 0 or self.reserved_gb >= self.gpu_memory_gb:
            raise ConfigError(f"cluster.reserved_gb={self.reserved_gb}: must lie in [0, gpu_memory_gb="
                              f"{self.gpu_memory_gb})")
        if self.mfu > 1:
            raise ConfigError(f"cluster.mfu={self.mfu}: a fraction of peak, must be <= 1 (e.g. 0.35)")
        if self.gpus % self.gpus_per_node:
            raise ConfigError(f"cluster.gpus={self.gpus} is not a multiple of cluster.gpus_per_node="
                              f"{self.gpus_per_node}; a job uses whole nodes: choose a multiple of "
                              f"{self.gpus_per_node}")
        return self


@dataclass(frozen=True)
class Layout:
    """The grid and the job shape being priced."""

    schedule: str  # 1f1b | zb1p | dualpipe | dualpipev
    pp: int  # pipeline ranks
    dp: int  # data-parallel size (ZeRO-1 shards dense optimizer state over it)
    ep: int  # expert-parallel size (expert optimizer state is sharded over DP / EP)
    microbatches: int  # per step and pipeline
    tokens: int  # tokens per micro-batch (micro-batch size x sequence length)
    fp8: bool  # price the paper's FP8 recipe (3.3): FP8 GEMM weights, cached inputs and dispatch
    dispatch: str = "hierarchical"  # flat | hierarchical (parallel.dispatch)
    stage_layers: tuple[int, ...] | None = None  # parallel.stage_layers
    moment_bytes: int = BF16  # bytes of one AdamW moment (optim.moment_dtype; the paper's bf16)
    compute_bytes: int = BF16  # bytes of a compute weight (trainer.dtype: bf16 on GPUs)

    @property
    def optimizer_bytes(self) -> int:
        """ZeRO-1 state per parameter before sharding: the fp32 master and the two moments."""
        return FP32 + 2 * self.moment_bytes

    @property
    def pipeline(self) -> Schedule:
        """The schedule object of `schedule` over `pp` ranks."""
        return make_schedule(self.schedule, self.pp)


# ---- the model, part by part ------------------------------------------------------------------------------------

@dataclass
class Part:
    """A piece of the model that a pipeline rank holds whole: "embed", "head" (final norm, output head and the
    MTP modules) or "layers.<i>" (names of `parallel.pipeline.stage.part_of`). Per-token figures."""

    dense: int = 0  # parameters every EP rank holds
    expert: int = 0  # routed-expert parameters, all experts (an EP rank holds 1/EP of them)
    router: int = 0  # of the dense ones, the router weights, which stay fp32 (paper 3.3)
    fp8_weights: int = 0  # of those, the GEMM weights an FP8 recipe stores in FP8 (not embedding, head, router, norms)
    fp8_flops: float = 0.0  # forward FLOPs per token of GEMMs an FP8 recipe runs in FP8
    bf16_flops: float = 0.0  # forward FLOPs per token of GEMMs kept in BF16: output head, router
    attn_flops: float = 0.0  # forward FLOPs per token of core attention (BF16, no weights)
    act_bytes: float = 0.0  # activation bytes per token kept for backward (`layer_activation_bytes`)
    act_fixed: float = 0.0  # activation bytes per micro-batch whatever its length (`head_activation_bytes`)
    moe_layers: int = 0  # MoE layers: one dispatch and one combine per micro-batch and direction


def model_parts(cfg: ModelConfig, seq_len: int, fp8: bool) -> dict[str, Part]:
    """Parameters, FLOPs and activation bytes of every part, from the model built on the meta device.

    FLOPs per token, forward (backward is priced as twice the forward in `stage_costs`): model/flops.py's count
    (the one the trainer's MFU uses), split by part and by precision: the router and the output head (once for
    the main model, once per MTP depth) in BF16, every other GEMM in FP8 under the FP8 recipe, the core attention
    apart; summed over the parts it is `model.flops.forward_flops`.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    parts: dict[str, Part] = defaultdict(Part)
    for name, p in model.named_parameters():
        part = parts[part_of(name)]
        if is_expert_param(name):
            part.expert += p.numel()
        else:
            part.dense += p.numel()
    for name, m in model.named_modules():
        if isinstance(m, Gate):
            parts[part_of(f"{name}.")].router += m.weight.numel()
        elif isinstance(m, (Linear, GroupedLinear)) and name != "head":
            parts[part_of(f"{name}.")].fp8_weights += m.weight.numel()

    def add_block(part: Part, layer: int) -> None:
        ffn = flops.ffn_macs(cfg, layer >= cfg.first_k_dense)
        part.bf16_flops += 2 * ffn.pop("router", 0)
        part.fp8_flops += 2 * (flops.mla_gemm_macs(cfg) + sum(ffn.values()))
        part.attn_flops += 2 * flops.attention_core_macs(cfg, (seq_len + 1) / 2)

    for i in range(cfg.n_layers):
        add_block(parts[f"layers.{i}"], i)
    head = parts["head"]
    head.bf16_flops += 2 * cfg.dim * cfg.vocab_size * (1 + cfg.n_mtp_depth)
    for k in range(cfg.n_mtp_depth):
        head.fp8_flops += 2 * 2 * cfg.dim * cfg.dim  # M_k
        add_block(head, cfg.n_layers + k)
    for i in range(cfg.n_layers):
        moe = i >= cfg.first_k_dense
        parts[f"layers.{i}"].act_bytes = layer_activation_bytes(cfg, moe, fp8)
        parts[f"layers.{i}"].moe_layers = int(moe)
    parts["head"].act_bytes, parts["head"].act_fixed = head_activation_bytes(cfg, fp8)
    parts["head"].moe_layers = sum(cfg.n_layers + k >= cfg.first_k_dense for k in range(cfg.n_mtp_depth))
    return dict(parts)


def layer_activation_bytes(cfg: ModelConfig, moe: bool, fp8: bool, attention: str = "fused",
                           seq_len: int | None = None) -> float:
    """Bytes per token that one Transformer block's forward keeps for its backward: the tensors its autograd graph
    saves (bench/scale.py measures them with saved-tensor hooks and tests/unit/test_activations.py holds this to
    10% of that), under the paper's storage policy (3.2.3, 3.3) as this model implements it.

    a = bytes per element of a GEMM's saved input: FP8_ACT (E4M3 + 1x128 fp32 scales) under FP8, else 2 (BF16);
    a GEMM pair reading one tensor (W_DQ/W_DKV, W1/W3) keeps one copy. r = 0 with recompute_norm (a norm's output
    is recomputed in backward, model/norm.py), else 1. d = dim, H heads, d_c = kv_lora_rank, d'_c = q_lora_rank,
    d_R = the decoupled RoPE width, I = the FFN's width, K routed experts per token, E experts.

        MLA    2d + 4                         block input (the attention norm's input) and its fp32 reciprocal RMS
             + r a d                          attention norm's output (input of W_DQ, W_DKV)
             + 2 d'_c + 2 (d_c + d_R)         latents c_Q, [c_KV; k_R] (BF16)
             + (recompute_mla_up_proj ? 0 :   with the flag, up-projections and core attention rerun in backward
                 r a (d'_c + d_c) + 4 + 4     latent norms' outputs (inputs of W_UQ, W_UKV), their statistics
                 + core + 4 d_R)              (+ the RoPE tables' BF16 casts for the q and k rotations)
             + o H d_v                        attention output = input of W_O (o = E5M6 + its scales under FP8)
        core   fused kernel (flash, memory-efficient, cuDNN: the GPU's SDPA): q, k (2 H d_qk each), the [k_C; v]
               up-projection v is a view of (2 H (d_nope + d_v)), the log-sum-exp (4 H) and, under FP8, its own BF16
               output (2 H d_v; in BF16 that is W_O's input); math kernel (`attention="math"`, CPU SDPA when the
               head widths differ): fp32 q, k, v (4 H (2 d_qk + d_v)) and the fp32 probabilities (4 H T per token)
        FFN    2d + 4                         the FFN norm's input and statistics
        dense  r a d + 2 (2 I) + a I          the norm's output (input of W1, W3), SwiGLU input (W1, W3 outputs,
                                              BF16; silu recomputed) and output (input of W2)
        MoE    r 2d + 4E + 12K + 4 (+ 4)      router: its input (the norm's output, BF16; routed in fp32 from it),
                                              affinities, top-K ids and weights, their sum (and the balance loss's
                                              per-token statistics)
             + (FP8 ? r a d : 0) + SwiGLU(I_s)  shared experts (I_s = n_shared x moe_inter_dim): their input's
                                              FP8 copy (in BF16 it is the router's), SwiGLU
             + K (a d + SwiGLU(I) + 20)       per routed row received (balanced: K per token): the dispatched
                                              token, SwiGLU (the gate weight scales its output, model/swiglu.py,
                                              so the expert's output is not kept), row index, slot index and
                                              gate weight
        SwiGLU(I) in MoE = a (2 I) under FP8 (output recomputed, paper 3.3.4); else 2 (2 I) + 2 I.

    Not counted: the layer output (the next layer's input, counted there), RoPE tables and other buffers shared
    by all layers, pipeline receive buffers and all-to-all buffers (in `Cluster.reserved_gb`)."""
    if attention not in ("fused", "math"):
        raise ValueError(f"attention={attention!r}: fused or math")
    if attention == "math" and seq_len is None:
        raise ValueError("attention='math' keeps T x T probabilities: give seq_len")
    a = FP8_ACT if fp8 else BF16
    d, h = cfg.dim, cfg.n_heads
    q_rank = cfg.q_lora_rank or 0
    r = 0 if cfg.recompute_norm else 1
    out = 2 * d + 4 + r * a * d + 2 * q_rank + 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if not cfg.recompute_mla_up_proj:
        out += r * a * (q_rank + cfg.kv_lora_rank) + 4 * (2 if q_rank else 1)
        if attention == "fused":
            out += 2 * h * 2 * cfg.qk_head_dim + 2 * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + 4 * h
            out += 2 * h * cfg.v_head_dim if fp8 else 0
        else:
            out += 4 * h * (2 * cfg.qk_head_dim + cfg.v_head_dim) + 4 * h * seq_len
        out += 4 * cfg.qk_rope_head_dim  # the RoPE tables cast to BF16 for the q and k rotations
    out += (E5M6_ACT if fp8 else BF16) * h * cfg.v_head_dim
    out += 2 * d + 4
    if not moe:
        return out + r * a * d + 2 * 2 * cfg.inter_dim + a * cfg.inter_dim

    def swiglu(inter: int) -> float:
        return a * 2 * inter if fp8 else 2 * 2 * inter + 2 * inter

    k = cfg.n_activated_experts
    balance_loss = (cfg.balance == "aux_free" and cfg.seq_aux_alpha > 0) or (
        cfg.balance in ("aux_loss", "batch_aux") and cfg.aux_loss_alpha > 0)
    out += r * 2 * d + 4 * cfg.n_routed_experts + 12 * k + 4 + (4 if balance_loss else 0)
    if cfg.n_shared_experts:
        inter = cfg.n_shared_experts * cfg.moe_inter_dim
        out += (r * a * d if fp8 else 0) + 2 * 2 * inter + a * inter
    return out + k * (a * d + swiglu(cfg.moe_inter_dim) + 20)


def head_activation_bytes(cfg: ModelConfig, fp8: bool, attention: str = "fused",
                          seq_len: int | None = None) -> tuple[float, float]:
    """(bytes per token, bytes per micro-batch) the last stage keeps beyond its blocks, as `layer_activation_bytes`
    counts a block's (n = 4 B of fp32 reciprocal RMS per norm, 0 with recompute_norm).

    Per head (main, then each MTP depth): the final norm's input 2d + n and its output 2d, which the fused linear
    cross-entropy (model/loss.py, BF16) keeps as its only input (the logits are recomputed chunk by chunk in
    backward), and the int64 targets. Per MTP depth also: the embedding's int64 ids and output (the input of its
    norm) 2d + n, the norm of the previous depth's hidden state (whose input the head above already keeps) n, the
    concatenated input of eh_proj 2 (2d) (it stays BF16, fp8/recipe.py), and a MoE block. Nothing per micro-batch:
    the head's weight gradient exists only inside backward."""
    d = cfg.dim
    n = 0 if cfg.recompute_norm else 4
    per_head = 2 * d + n + 2 * d + 8
    per_depth = 8 + 2 * d + 2 * n + 2 * 2 * d + layer_activation_bytes(cfg, True, fp8, attention, seq_len)
    return per_head + cfg.n_mtp_depth * (per_head + per_depth), 0.0


# ---- memory per pipeline rank -----------------------------------------------------------------------------------

def stage_parts(spec: StageSpec) -> list[str]:
    """The parts a stage runs: its layers, the embedding on the first stage, the head (and MTP) on the last."""
    return (["embed"] if spec.first else []) + [f"layers.{i}" for i in spec.layers] + (["head"] if spec.last else [])


def held_parts(specs: list[StageSpec], mtp: bool) -> list[str]:
    """The parts a rank holds (once, whatever the number of its stages that use them): as `keep_stages`, the
    embedding also sits with the last stage when MTP needs it (paper 2.2: shared embedding)."""
    names = [name for spec in specs for name in stage_parts(spec)]
    if mtp and any(spec.last for spec in specs):
        names.append("embed")
    return list(dict.fromkeys(names))


def peak_live_bytes(actions: list[Action], chunk_bytes: list[float]) -> float:
    """Most activation bytes alive at once on a rank running `actions`: a (phase, micro-batch) chunk holds
    chunk_bytes[phase] from its F until its B, counted as `validate.peak_activations` counts chunks (with equal
    bytes per phase it is that count times the bytes)."""
    live: dict[tuple[int, int], float] = {}
    peak = 0.0
    for action in actions:
        for part in action.parts():
            if part.kind == "F":
                live[(part.phase, part.microbatch)] = chunk_bytes[part.phase]
                peak = max(peak, sum(live.values()))
            elif part.kind == "B":
                live.pop((part.phase, part.microbatch), None)
    return peak


@dataclass
class RankMemory:
    """What one pipeline rank (any of its DP x EP replicas) holds, in bytes."""

    rank: int
    stages: list[StageSpec]
    dense: int  # dense parameters held (DualPipe: both stages)
    expert: int  # routed-expert parameters held (this EP rank's E/EP experts)
    weights: float  # the parameters as the model holds them: compute dtype, the router fp32
    grads: float  # fp32 main gradients of every parameter held (paper 3.3), not sharded under ZeRO-1
    optimizer: float  # fp32 master + two moments, dense over DP, experts over DP / EP
    activations: float  # peak over the schedule of the live chunks' activations
    live_chunks: int  # chunks (stage x micro-batch) alive at that peak
    reserved: float
    fp8_cache: float = 0.0  # under FP8: the GEMM weights quantised once per step (E4M3 + 128x128 block scales)

    @property
    def params(self) -> int:
        return self.dense + self.expert

    @property
    def total(self) -> float:
        return self.weights + self.fp8_cache + self.grads + self.optimizer + self.activations + self.reserved


def rank_memory(cfg: ModelConfig, parts: dict[str, Part], layout: Layout, rank: int, reserved: float) -> RankMemory:
    """Memory of pipeline rank `rank`: its stages from `rank_stages`, parameters from `parts`, activations from
    `peak_live_bytes` over the rank's own action list (`Schedule.actions`)."""
    stage_layers = list(layout.stage_layers) if layout.stage_layers is not None else None
    specs = rank_stages(layout.pipeline, rank, cfg.n_layers, stage_layers)
    held = [parts[name] for name in held_parts(specs, cfg.n_mtp_depth > 0)]
    dense = sum(p.dense for p in held)
    expert = sum(p.expert for p in held) // layout.ep
    router = sum(p.router for p in held)
    fp8_dense = sum(p.fp8_weights - p.expert for p in held) if layout.fp8 else 0
    fp8_expert = expert if layout.fp8 else 0
    weights = layout.compute_bytes * (dense - router + expert) + FP32 * router
    optimizer = layout.optimizer_bytes * (dense / layout.dp + expert / (layout.dp // layout.ep))
    chunk = [sum(layout.tokens * parts[name].act_bytes + parts[name].act_fixed for name in stage_parts(spec))
             for spec in specs]
    actions = layout.pipeline.actions(rank, layout.microbatches)
    activations = peak_live_bytes(actions, chunk)
    return RankMemory(rank, specs, dense, expert, weights, FP32 * (dense + expert), optimizer, activations,
                      peak_activations(actions), reserved, FP8_WEIGHT * (fp8_dense + fp8_expert))


# ---- expert all-to-all ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AllToAll:
    """One MoE layer, one micro-batch, one GPU, one direction (the backward moves the same bytes the other way:
    the gradients into the down-projection in FP8, those of the dispatched rows in BF16, paper 3.3.4)."""

    nodes_per_token: float  # nodes a token reaches (node-limited routing: <= topk_group)
    dispatch_ib: float  # bytes sent over InfiniBand
    dispatch_nvlink: float  # bytes sent over NVLink
    combine_ib: float
    combine_nvlink: float
    dispatch_s: float  # time, the two legs pipelined: max(IB bytes / IB, NVLink bytes / NVLink)
    combine_s: float

    @property
    def seconds(self) -> float:
        return self.dispatch_s + self.combine_s


def all_to_all(cfg: ModelConfig, layout: Layout, cluster: Cluster) -> AllToAll:
    """Dispatch (FP8 + 1x128 scales under FP8, else BF16) and combine (BF16) volumes of one GPU's micro-batch.

    The EP group spans n = ceil(EP / gpus_per_node) nodes with g = min(EP, gpus_per_node) of its GPUs each. A
    token's K experts sit on (at most) R = min(K, EP) GPUs of m = min(topk_group, n) nodes (node-limited routing;
    m taken at its bound), the m nodes a uniform choice of the n, so m (n-1)/n of them are remote.
    - hierarchical (paper 3.2.2): one IB row per remote node, to the GPU with the same in-node index, which
      forwards it over NVLink to the token's GPUs there; inside the sender's node rows go over NVLink directly.
      IB rows per token m (n-1)/n; NVLink rows R (1 - 1/g) (a destination is the landing GPU with chance 1/g).
    - flat: one row per destination GPU: R (n-1)/n over IB, R (1/n)(1 - 1/g) over NVLink.
    The combine sends the same rows back (reduced inside the node first under hierarchical).
    Balanced expert load is assumed (aux-loss-free balancing); rows are counted per GPU, not deduplicated."""
    gpn = cluster.gpus_per_node
    n = -(-layout.ep // gpn)
    g = min(layout.ep, gpn)
    rows = min(cfg.n_activated_experts, layout.ep)
    m = min(cfg.topk_group, n) if n > 1 else 1
    if layout.ep == 1:
        ib_rows = nvl_rows = 0.0
    elif layout.dispatch == "hierarchical":
        ib_rows, nvl_rows = m * (n - 1) / n, rows * (1 - 1 / g)
    else:
        ib_rows, nvl_rows = rows * (n - 1) / n, rows / n * (1 - 1 / g)
    dispatch_row = cfg.dim * (FP8_ACT if layout.fp8 else BF16)
    combine_row = cfg.dim * BF16
    t = layout.tokens
    d_ib, d_nvl = t * ib_rows * dispatch_row, t * nvl_rows * dispatch_row
    c_ib, c_nvl = t * ib_rows * combine_row, t * nvl_rows * combine_row
    ib, nvl = cluster.ib_gbps * GB, cluster.nvlink_gbps * GB
    return AllToAll(float(m), d_ib, d_nvl, c_ib, c_nvl, max(d_ib / ib, d_nvl / nvl), max(c_ib / ib, c_nvl / nvl))


# ---- time -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageCost:
    """One stage, one micro-batch, in seconds."""

    F: float  # forward compute
    B: float  # full backward compute: 2 F (input and weight gradients each cost a forward; attention 2x too)
    W: float  # weight-gradient part of B: the GEMM share of F (core attention has no weights)
    comm: float  # expert all-to-all of one direction (forward or backward)
    flops: float  # forward FLOPs


def stage_costs(cfg: ModelConfig, parts: dict[str, Part], layout: Layout, cluster: Cluster,
                a2a: AllToAll) -> list[StageCost]:
    """Costs of every stage (model order): FLOPs / (peak x mfu), FP8 GEMMs at the FP8 peak under FP8."""
    stage_layers = list(layout.stage_layers) if layout.stage_layers is not None else None
    n = layout.pipeline.n_stages
    fp8_peak = (cluster.peak_tflops_fp8 if layout.fp8 else cluster.peak_tflops_bf16) * 1e12 * cluster.mfu
    bf16_peak = cluster.peak_tflops_bf16 * 1e12 * cluster.mfu
    out = []
    for s, layers in enumerate(split_layers(cfg.n_layers, n, stage_layers)):
        names = stage_parts(StageSpec(s, n, layers))
        fp8 = layout.tokens * sum(parts[p].fp8_flops for p in names)
        bf16 = layout.tokens * sum(parts[p].bf16_flops for p in names)
        attn = layout.tokens * sum(parts[p].attn_flops for p in names)
        w = fp8 / fp8_peak + bf16 / bf16_peak
        f = w + attn / bf16_peak
        comm = a2a.seconds * sum(parts[p].moe_layers for p in names)
        out.append(StageCost(f, 2 * f, w, comm, fp8 + bf16 + attn))
    return out


def overlapped(layout: Layout) -> bool:
    """DualPipe and DualPipeV overlap a forward chunk with another micro-batch's backward chunk (F&B)."""
    return layout.pipeline.overlaps


def action_seconds(costs: list[StageCost], stage_of_phase: list[int], action: Action) -> float:
    """A plain chunk exposes its all-to-all (no partner to hide it behind); an overlapped F&B pair costs
    max(compute of both, communication of both) (paper 3.2.1: both all-to-alls hidden under computation)."""
    if action.kind == "FB":
        f, b = costs[stage_of_phase[action.forward.phase]], costs[stage_of_phase[action.backward.phase]]
        w = b.W if action.backward.defer_w else 0.0
        return max(f.F + b.B - w, f.comm + b.comm)
    c = costs[stage_of_phase[action.phase]]
    if action.kind == "F":
        return c.F + c.comm
    if action.kind == "B":
        return c.B + c.comm - (c.W if action.defer_w else 0.0)
    return c.W


def chunk_costs(costs: list[StageCost], layout: Layout) -> Costs:
    """Table 2's uniform chunk costs, taken from the heaviest stage (an upper bound when stages differ)."""
    c = max(costs, key=lambda s: s.F + s.B + 2 * s.comm)
    fb = max(c.F + c.B, 2 * c.comm) if overlapped(layout) else None
    return Costs(F=c.F + c.comm, B=c.B + c.comm, W=c.W, FB=fb)


@dataclass(frozen=True)
class StepTime:
    """One optimizer step of the busiest pipeline rank, in seconds."""

    rank_busy: tuple[float, ...]  # each pipeline rank's chunk time per step (compute + exposed all-to-all)
    bubble: float  # Table 2's bubble for `costs` (formula_bubble)
    sync: float  # ZeRO-1 reduce-scatter + all-gather and the mirror-copy gradient sum, over IB, not overlapped
    simulated: float  # cross-check: makespan of the event-driven simulation with per-stage costs, + sync
    costs: Costs  # the chunk costs the bubble is priced with

    @property
    def busy(self) -> float:
        return max(self.rank_busy)

    @property
    def total(self) -> float:
        return self.busy + self.bubble + self.sync


def sync_seconds(cfg: ModelConfig, parts: dict[str, Part], memories: list[RankMemory], layout: Layout,
                 cluster: Cluster) -> float:
    """Per step, the slowest rank: reduce-scatter of the fp32 gradients and all-gather of the compute weights over
    DP (dense) and DP / EP (experts), ring algorithms moving (n-1)/n of the bytes over IB; plus the sum of the
    gradients of parts held by k > 1 pipeline ranks (DualPipe's copies, the embedding of 1F1B with MTP: an
    all-reduce moving 2 (k-1)/k of the fp32 bytes, `stage.holders`). Overlap with the last backward chunks is
    ignored: an upper bound."""
    stage_layers = list(layout.stage_layers) if layout.stage_layers is not None else None
    holder = holders(layout.pipeline, cfg.n_layers, stage_layers, cfg.n_mtp_depth > 0)
    edp = layout.dp // layout.ep
    out = 0.0
    for mem in memories:
        weight_bytes = mem.weights / max(mem.params, 1)  # average bytes of a compute weight on this rank
        traffic = mem.dense * (FP32 + weight_bytes) * (layout.dp - 1) / layout.dp
        traffic += mem.expert * (FP32 + weight_bytes) * (edp - 1) / edp
        for name in held_parts(mem.stages, cfg.n_mtp_depth > 0):
            k = len(holder[name])
            traffic += FP32 * (parts[name].dense + parts[name].expert / layout.ep) * 2 * (k - 1) / k
        out = max(out, traffic / (cluster.ib_gbps * GB))
    return out


def step_time(cfg: ModelConfig, costs: list[StageCost], layout: Layout, sync: float) -> StepTime:
    """busy (the busiest rank's actions priced by `action_seconds`) + Table 2 bubble + sync."""
    stage_layers = list(layout.stage_layers) if layout.stage_layers is not None else None
    schedule = layout.pipeline
    schedules, phase_stages = [], []
    for r in range(layout.pp):
        schedules.append(schedule.actions(r, layout.microbatches))
        specs = rank_stages(schedule, r, cfg.n_layers, stage_layers)
        phase_stages.append([spec.index for spec in specs])
    busy = tuple(sum(action_seconds(costs, phase_stages[r], a) for a in schedules[r]) for r in range(layout.pp))
    uniform = chunk_costs(costs, layout)
    bubble = formula_bubble(schedule, uniform)
    timeline = simulate(schedule, layout.microbatches, lambda r, a: action_seconds(costs, phase_stages[r], a),
                        schedules)
    return StepTime(busy, bubble, sync, timeline.makespan + sync, uniform)
