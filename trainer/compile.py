"""`trainer.compile`: torch.compile of the dense parts of the model, applied from outside as the parallelisms are
(DESIGN.md principle 1): the model code knows nothing about it, and `compile_dense` runs after
`parallel.parallelize` and the dtype casts, on whatever part of the model this rank holds.

What is compiled, each module on its own (`nn.Module.compile`, so parameter and checkpoint names do not change):

- every MLA (model/mla.py): its split, latent norms, RoPE, concatenations and the attention core;
- every SwiGLU MLP (model/moe.py `MLP`): the dense FFNs and the shared experts;
- every other RMSNorm (the blocks' two, the final norm, the MTP modules' three).

What stays eager, and why:

- the MoE's routing and routed experts (router top-k, the bias counts, dispatch and combine, the grouped expert
  GEMMs, the balance losses): data-dependent shapes, host-side plans and, under expert parallelism, the
  all-to-all; they are simply not among the compiled modules;
- every Linear call, inside the compiled modules too (`torch.compiler.disable` on each one: a graph break per
  call, 5 per MLA with a query latent and 3 per MLP). A compiled backward is traced once, with its forward, so a
  Linear inside a graph would always return its weight gradient at once, while a pipeline executor decides only at
  backward time whether it is deferred into a `WeightGradStore` (zero-bubble W, model/linear.py); an FP8 strategy
  keeps caches keyed by tensor versions (fp8/linear.py) and adds fp32 main gradients outside autograd. Eager, all
  of it works unchanged, for little loss: on the CPU the tiny model's step measured 1.09-1.11x with eager GEMMs
  and 1.10-1.14x with the GEMMs inside the graphs, two runs each on a shared machine (`python -m bench.compile`,
  `--gemms-in-graph`);
- a norm with `recompute_norm` (it marks its output for the saved-tensor hooks, model/norm.py: a side effect on a
  tensor) and an MLA with `recompute_mla_up_proj` (its checkpointed region would have to hold the eager Linears).
  The saved-tensor hooks then see the eager Linears' inputs as before, so the savings stay.

Shapes: `dynamic=False`. Training sees one micro-batch shape (packed sequences of data.seq_len) and validation
the same shape under no_grad, so each frame is compiled once per grad mode (the tiny model: 13 frames, 7 graphs,
11 graph breaks and 2 recompiles, the MLP's two widths, in training; 13 recompiles at the first validation);
another shape compiles every frame once more (dynamo's recompile limit, 8 per frame, then runs it eagerly).
`compile_stats` counts all of these; TORCH_LOGS=graph_breaks,recompiles prints each with its reason.

Dynamo shares compiled frames between instances of a module class and its guards do not see an instance's eager
wrapper: one process should not hold models compiled in different ways (compile_dense treats all alike).
"""

from __future__ import annotations

import torch
from torch import nn

from model.linear import Linear
from model.mla import MLA
from model.moe import MLP
from model.norm import RMSNorm


def _eager(module: nn.Module) -> None:
    """Run `module` eagerly when a compiled module calls it (a graph break)."""
    if not getattr(module, "_compile_eager", False):
        module.forward = torch.compiler.disable(module.forward)
        module._compile_eager = True


def dense_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules `compile_dense` compiles, by module path: MLAs (without recompute_mla_up_proj), SwiGLU MLPs
    and the RMSNorms outside MLA (without recompute_norm)."""
    out, inside_mla = [], set()
    for name, m in model.named_modules():
        if isinstance(m, MLA):
            inside_mla |= {id(sub) for sub in m.modules()}
            if not m.recompute_up_proj:
                out.append((name, m))
        elif isinstance(m, MLP) or (isinstance(m, RMSNorm) and id(m) not in inside_mla and not m.recompute):
            out.append((name, m))
    return out


def compile_dense(model: nn.Module, backend: str = "inductor") -> int:
    """Compile the dense parts of `model` in place (the module docstring says which, and what stays eager);
    returns the number of modules compiled. Compilation itself happens at each module's first call."""
    modules = [m for _, m in dense_modules(model) if m._compiled_call_impl is None]
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, Linear) or (isinstance(sub, RMSNorm) and sub.recompute):
                _eager(sub)
        m.compile(backend=backend, dynamic=False)
    return len(modules)


def compiled_modules(model: nn.Module) -> list[str]:
    """The module paths of `model` that run compiled."""
    return [name for name, m in model.named_modules() if m._compiled_call_impl is not None]


def compile_stats() -> dict[str, float]:
    """What dynamo did in this process so far: frames compiled, FX graphs made, graph breaks (each distinct break
    counted once per compiled frame), recompiles (frames compiled again for a new shape or grad mode) and the
    seconds spent compiling frames (forward and backward graphs)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    metrics = get_compilation_metrics()
    return {"frames": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(1 for m in metrics if m.recompile_reason is not None),
            "compile_s": sum(m.entire_frame_compile_time_s or 0.0 for m in metrics)}
