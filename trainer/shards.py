"""Which pieces of the checkpoint's global tensors this rank writes, and which it reads back (the geometry that
trainer/checkpoint.py's layout-free format needs), for any layout of the grid, one process included.

Every entry is stored under the single-process model's name and shape. Routed experts are dim-0 blocks of E/EP
experts per EP rank (contiguous when flattened); every other entry is whole. Of a trained parameter, a rank
writes the range its optimizer shard covers (ZeRO-1: each element has one writer; one process: all of it); an
entry no optimizer shard covers (a buffer such as the router bias) is written by DP rank 0 of the pipeline
position that writes it, or for routed experts by expert-DP rank 0 of every EP rank. Of the pipeline ranks that
hold a copy (DualPipe's mirrors, the embedding shared with MTP), only the first writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from optim.optimizer import Optimizer
from parallel.expert import is_expert_param
from parallel.grid import ProcessGrid
from parallel.pipeline.pipeline import Pipeline
from trainer.checkpoint import CheckpointError, CheckpointReader, Shard


def model_index(whole: nn.Module) -> tuple[dict[str, torch.Size], set[str]]:
    """The names and shapes of a model's state and the names of its parameters: of the whole model, as built on
    every rank before it is cut to the rank's stages and experts, these are the checkpoint's."""
    return {name: t.shape for name, t in whole.state_dict().items()}, {name for name, _ in whole.named_parameters()}


class Shards:
    """The checkpoint geometry of this rank; `global_shapes` and `global_params` are `model_index` of the whole
    model."""

    def __init__(self, grid: ProcessGrid, pipeline: Pipeline, global_shapes: dict[str, torch.Size],
                 global_params: set[str]) -> None:
        self.grid, self.pipeline = grid, pipeline
        self.global_shapes, self.global_params = global_shapes, global_params

    def _place(self, name: str, local_shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """The global shape of entry `name` and where this rank's block starts in it, flattened."""
        local_shape = tuple(local_shape)
        if self.grid.ep > 1 and is_expert_param(name) and local_shape:
            return (local_shape[0] * self.grid.ep, *local_shape[1:]), self.grid.ep_rank * math.prod(local_shape)
        return local_shape, 0

    def _local(self, name: str, global_shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """The inverse of `_place`: this rank's shape of a saved entry and its start in the flattened whole."""
        global_shape = tuple(global_shape)
        if self.grid.ep > 1 and is_expert_param(name) and global_shape:
            local = (global_shape[0] // self.grid.ep, *global_shape[1:])
            return local, self.grid.ep_rank * math.prod(local)
        return global_shape, 0

    def _first_holder(self, name: str) -> bool:
        return self.pipeline.holders(name)[0] == self.grid.pp_rank

    def _writes_whole(self, name: str) -> bool:
        g = self.grid
        return g.edp_rank == 0 if g.ep > 1 and is_expert_param(name) else g.dp_rank == 0

    # ---- writing -----------------------------------------------------------------------------------------------
    def model(self, state: dict[str, torch.Tensor], opt: Optimizer) -> dict[str, Shard]:
        """This rank's pieces of a model-shaped state (the weights, or their EMA)."""
        owned, out = opt.owned(), {}
        for name, tensor in state.items():
            if not self._first_holder(name):
                continue  # another pipeline rank holds the copy that is written
            if name in opt.params:
                if name not in owned:
                    continue
                a, z = owned[name]
            elif self._writes_whole(name):
                a, z = 0, tensor.numel()
            else:
                continue
            shape, offset = self._place(name, tensor.shape)
            out[name] = Shard(tensor.detach().reshape(-1)[a:z], shape, offset + a)
        return out

    def ema(self, ema) -> dict[str, Shard]:
        """This rank's pieces of the EMA (trainer/ema.py): the ranges it keeps, which are its optimizer's, written
        straight from the average (no parameter-sized tensor is made)."""
        out = {}
        for name, (start, data) in ema.pieces().items():
            if self._first_holder(name):
                shape, offset = self._place(name, ema.shapes[name])
                out[name] = Shard(data, shape, offset + start)
        return out

    def optim(self, opt: Optimizer) -> dict[str, Shard]:
        """This rank's pieces of the optimizer state (optim/optimizer.py's keys). A parameter's step count is
        written by the rank holding its first element."""
        out, owned = {}, opt.owned()
        for key, (start, data) in opt.shards().items():
            kind, name = key.split(".", 1)
            if not self._first_holder(name):
                continue
            shape, offset = self._place(name, opt.params[name].shape)
            if kind == "step":
                if owned.get(name, (-1,))[0] == 0 and offset == 0:
                    out[key] = Shard(data, (), 0)
            else:
                out[key] = Shard(data, shape, offset + start)
        return out

    # ---- reading -----------------------------------------------------------------------------------------------
    def read_local(self, reader: CheckpointReader, group: str, shapes: dict[str, torch.Size],
                   every: set[str], ranges: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """This rank's view of a model-shaped group: every entry of `shapes` (its local shapes), experts cut to
        this EP rank's block, each read from just the checkpoint ranges that hold it. `every`: the names the
        whole model has in this group (this rank's pipeline stages hold only some), to check the checkpoint's.
        `ranges`: read only elements [a, z) of each flattened local tensor, returned flat."""
        saved = set(reader.names(group))
        missing, unexpected = sorted(every - saved), sorted(saved - every)
        wrong = [f"{n} {list(reader.shape(group, n))} (now {list(self._place(n, s)[0])})"
                 for n, s in shapes.items() if n in saved and reader.shape(group, n) != self._place(n, s)[0]]
        if missing or unexpected or wrong:
            raise CheckpointError(f"{reader.path}: the {group} tensors do not fit this model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}. It was written by "
                                  "another model config; resume with that config or start anew (trainer.resume=null)")
        out = {}
        for name, shape in shapes.items():
            _, offset = self._place(name, shape)
            if ranges is None:
                out[name] = reader.read(group, name, offset, offset + math.prod(shape)).view(shape)
            else:
                a, z = ranges[name]
                out[name] = reader.read(group, name, offset + a, offset + z)
        return out

    def load_model(self, model: nn.Module, reader: CheckpointReader) -> None:
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        model.load_state_dict(self.read_local(reader, "model", shapes, set(self.global_shapes)))

    def load_ema(self, ema, reader: CheckpointReader) -> None:
        """Each rank reads just the EMA ranges it keeps."""
        ema.load_pieces(self.read_local(reader, "ema", ema.shapes, self.global_params, ema.ranges))

    def load_optim(self, opt: Optimizer, reader: CheckpointReader) -> None:
        """Each rank reads its own optimizer ranges (ZeRO-1: its shards; one process: everything). Load the model
        first: the masters of fp32 parameters are the parameters."""
        shapes, offsets = {}, {}
        for key in reader.names("optim"):
            name = key.split(".", 1)[1]
            if name in opt.params or name not in self.global_params:  # other stages' entries are theirs
                shapes[key], offsets[key] = self._local(name, reader.shape("optim", key))
        opt.load_shards(shapes, lambda key, a, z: reader.read("optim", key, offsets[key] + a, offsets[key] + z))
