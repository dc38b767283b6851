"""Per-micro-batch memory multipliers of the fused head and of the FP8 weights (paper 3.3), measured against what
the previous implementation held.

What is measured, on CPU in fp32 (FP8 in `fp8=emulate`, numerically the recipe):

1. Head (model/loss.py), vocab 32768 x dim 256, 1024 tokens per micro-batch: the bytes the fused head +
   cross-entropy keeps from forward to backward for one micro-batch (`torch.autograd.graph.saved_tensors_hooks`,
   each storage once, the head weight itself excluded). Before (derived from the shapes): the previous head
   computed both gradients in forward and kept d loss / d h [tokens, dim] and the fp32 weight gradient
   [vocab, dim] until backward.
2. FP8 weights (fp8/linear.py), a 2-layer model of dim 256 (1 dense + 1 MoE layer of 8 experts), 3 micro-batches
   of 2 x 256 tokens whose graphs are alive at once: the FP8 weight copies reachable from the live autograd
   graphs (saved tensors and the FP8 functions' own attributes, walked from each loss, each storage once), in
   total and those reachable from one graph only; then the modules' caches after the backward (the step's one
   shared copy, with the transposed blocks Dgrad uses). Before (derived): every forward quantised every weight
   again and its graph kept that copy (1 byte per parameter + an fp32 scale per 128x128 block: the storages one
   call of the quantiser returns, computed here), per live micro-batch; nothing outlived the step.
3. Deferred W, the same model with every FP8 Linear's weight gradient deferred (a pipeline's zero-bubble W): the bytes
   the WeightGradStore holds after the backward for input of one micro-batch, parameters aside. Before (derived):
   the previous closures held, for each FP8 tensor held now (an activation's E4M3 or E5M6 cache, or the 128x1
   groups of an activation gradient), the same elements in fp32.
4. DeepSeek-V3 (derived): the head's weight gradient per live micro-batch, vocab 129280 x dim 7168 in fp32.

Each derivation of "before" was checked once against the previous code (git history), measured the same way: the
head's 33.0 MiB and the deferred store's 17.6 MiB exactly, and two more FP8 weight copies for three live
micro-batches.

    python -m bench.multipliers   # prints a table, writes bench/results/multipliers.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fp8.config import FP8Config
from fp8.linear import CACHE_ATTR, FP8Weight
from fp8.quant import FP8, quantize_128x128
from fp8.recipe import apply_fp8, fp8_modules
from model import ModelConfig, Transformer
from model.linear import Linear, WeightGradStore
from model.loss import linear_cross_entropy

RESULTS = Path(__file__).resolve().parent / "results" / "multipliers.json"
HEAD = dict(vocab=32768, dim=256, tokens=1024)
MODEL = dict(vocab_size=8192, dim=256, n_layers=2, first_k_dense=1, inter_dim=512, n_heads=2, q_lora_rank=128,
             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8,
             n_shared_experts=1, n_activated_experts=2, n_group=1, topk_group=1, moe_inter_dim=128,
             max_seq_len=256, n_mtp_depth=0, expert_gemm="loop")
N_MICRO, BATCH, SEQ = 3, 2, 256
MiB = 2 ** 20


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def head_bytes() -> dict[str, int]:
    """What the fused head keeps from forward to backward for one micro-batch (measured), and before (derived)."""
    torch.manual_seed(0)
    head = Linear(HEAD["dim"], HEAD["vocab"])
    h = torch.randn(HEAD["tokens"], HEAD["dim"], requires_grad=True)
    labels = torch.randint(0, HEAD["vocab"], (HEAD["tokens"],))
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, n = _storage(t)
        if ptr != _storage(head.weight)[0]:
            kept[ptr] = n
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(h, head, labels)
    loss.backward()
    before = h.nbytes + head.weight.numel() * 4  # d loss / d h and the fp32 weight gradient
    return {"after": sum(kept.values()), "before": before, "weight_grad_fp32": head.weight.numel() * 4}


def _reachable(root: object) -> tuple[list[torch.Tensor], list[FP8Weight]]:
    """Tensors and FP8Weights reachable from an autograd node or a queued closure: the graph's saved tensors, the
    attributes of custom functions' contexts, closure cells, containers (modules are not entered)."""
    tensors, weights, seen, todo = [], [], set(), [root]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen or isinstance(obj, nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, FP8Weight):
            weights.append(obj)
        elif isinstance(obj, (list, tuple)):
            todo += list(obj)
        elif isinstance(obj, dict):
            todo += list(obj.values())
        elif callable(obj) and hasattr(obj, "__closure__"):
            todo += [c.cell_contents for c in obj.__closure__ or ()]
        elif hasattr(obj, "__wrapped__"):  # functools.cache
            todo.append(obj.__wrapped__)
        elif hasattr(obj, "next_functions"):  # an autograd node
            todo += [f for f, _ in obj.next_functions]
            todo += [getattr(obj, a) for a in dir(obj) if a.startswith("_saved_")]
            if hasattr(obj, "saved_tensors"):  # a custom Function's context
                todo += list(obj.saved_tensors) + list(vars(obj).values())
    return tensors, weights


def _weight_storages(weights: list[FP8Weight]) -> dict[int, int]:
    out: dict[int, int] = {}
    for w in weights:
        for t in (*w.blocks, *(w._transposed or ())):
            ptr, n = _storage(t)
            out[ptr] = n
    return out


def _fp8_model() -> tuple[Transformer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL).validate())
    apply_fp8(model, FP8Config(recipe="emulate"))
    g = torch.Generator().manual_seed(0)
    return model, [torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=g) for _ in range(N_MICRO)]


def _loss(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    return model.loss(tokens[:, :-1], tokens[:, 1:], mtp_lambda=0.0).loss


def fp8_weight_bytes() -> dict[str, int]:
    """FP8 weight copies held with N_MICRO live micro-batches (measured), per micro-batch, and after the step."""
    model, batches = _fp8_model()
    modules = fp8_modules(model)
    # one fresh quantisation of every weight matrix, as each forward made before (storages as the quantiser returns)
    mats = [w for m in modules for w in (m.weight.detach().unbind(0) if m.weight.dim() == 3 else [m.weight.detach()])]
    one_copy = sum(_storage(t)[1] for w in mats for t in quantize_128x128(w, True))
    losses = [_loss(model, t) for t in batches]
    per_graph = [_weight_storages(_reachable(loss.grad_fn)[1]) for loss in losses]
    held = {ptr: n for graph in per_graph for ptr, n in graph.items()}
    exclusive = [sum(n for ptr, n in g.items() if sum(ptr in other for other in per_graph) == 1) for g in per_graph]
    for loss in losses:
        loss.backward()
    cached = _weight_storages([w for m in modules for w in getattr(m, CACHE_ATTR)[1]])
    return {"fp8_params": sum(m.weight.numel() for m in modules), "one_copy": one_copy,
            "before_live": N_MICRO * one_copy, "after_live": sum(held.values()),
            "before_per_micro_batch": one_copy, "after_per_micro_batch": max(exclusive),
            "after_step_cache": sum(cached.values())}


def deferred_w_bytes() -> dict[str, int]:
    """What a WeightGradStore holds after one micro-batch's B with every FP8 W deferred (measured), and before."""
    model, batches = _fp8_model()
    store = WeightGradStore()
    for m in fp8_modules(model):
        m.wgrad_store = store
    _loss(model, batches[0]).backward()
    params = {_storage(p)[0] for p in model.parameters()}
    held: dict[int, tuple[int, torch.Tensor]] = {}
    for fn in store._queue:
        for t in _reachable(fn)[0]:
            ptr, n = _storage(t)
            if ptr not in params:
                held[ptr] = (n, t)
    by_dtype: dict[torch.dtype, int] = {}
    for n, t in held.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + n
    # each E4M3 element, and each E5M6 element (1.5 bytes, packed in uint8), stands for an fp32 one before
    elements = by_dtype.get(FP8, 0) + by_dtype.get(torch.uint8, 0) * 2 // 3
    store.flush()
    return {"after": sum(by_dtype.values()), "after_e4m3": by_dtype.get(FP8, 0),
            "after_e5m6": by_dtype.get(torch.uint8, 0), "after_fp32_scales": by_dtype.get(torch.float32, 0),
            "after_other": sum(n for d, n in by_dtype.items() if d not in (FP8, torch.uint8, torch.float32)),
            "before": 4 * elements, "tensors": len(held)}


def main() -> dict:
    torch.set_num_threads(2)
    head, fp8, deferred = head_bytes(), fp8_weight_bytes(), deferred_w_bytes()
    v3_head = 129280 * 7168 * 4
    rows = [
        ("head: kept fwd->bwd per micro-batch", head["before"], head["after"], "derived", "measured"),
        (f"FP8 weights: {N_MICRO} live micro-batches", fp8["before_live"], fp8["after_live"], "derived", "measured"),
        ("FP8 weights: per live micro-batch", fp8["before_per_micro_batch"], fp8["after_per_micro_batch"],
         "derived", "measured"),
        ("FP8 weights: kept after the step (shared)", 0, fp8["after_step_cache"], "derived", "measured"),
        ("deferred W store per micro-batch", deferred["before"], deferred["after"], "derived", "measured"),
        ("DeepSeek-V3 head per live micro-batch", v3_head, 0, "derived", "derived"),
    ]
    print(f"head: vocab {HEAD['vocab']} x dim {HEAD['dim']}, {HEAD['tokens']} tokens; FP8 model: dim {MODEL['dim']}, "
          f"{fp8['fp8_params'] / 1e6:.2f}M FP8 parameters, {BATCH} x {SEQ} tokens per micro-batch")
    print(f"{'what':44} {'before MiB':>11} {'after MiB':>10}  before / after")
    for what, before, after, how_b, how_a in rows:
        print(f"{what:44} {before / MiB:>11.2f} {after / MiB:>10.2f}  {how_b} / {how_a}")
    result = {"head": {**HEAD, **head}, "fp8_weights": {**fp8, "n_micro": N_MICRO, "tokens": BATCH * SEQ},
              "deferred_w": deferred, "deepseek_v3_head_weight_grad_bytes": v3_head, "model": MODEL,
              "rows": [dict(what=w, before_bytes=b, after_bytes=a, before=hb, after=ha) for w, b, a, hb, ha in rows]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
