"""(d) One rank on a real NCCL group (NCCL refuses two ranks on one GPU, so this is the most a single GPU can check):
it makes a world-size-1 process group itself, with the grid's two backends (`cuda:nccl,cpu:gloo`), and runs on it
what the trainer runs across ranks: the expert dispatcher (flat and hierarchical, with and without the FP8
payload, forward and backward) against the local experts, ZeRO-1 with its collectives forced, the metric
collectives, the bias balancer, a checkpoint save and the hang watchdog's flight-recorder dump (NCCL's recorder and
gloo's). Every collective meets the tensors the code really gives it,
so a host tensor handed to NCCL, or a device tensor to gloo, fails here. Prints a JSON line of what it checked.

    python tests/gpu/nccl_one_rank.py OUT_DIR [cuda|cpu]   # cuda: tests/gpu/test_nccl.py; cpu (gloo alone):
                                                            # tests/dist/test_one_rank_script.py keeps it working
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(out_dir: Path, device: str = "cuda") -> dict:
    from fp8.gemm import calc_diff
    from fp8.recipe import FP8Payload
    from model.grads import attach_main_grads
    from model.moe import Gate, RoutedExperts
    from optim.config import OptimConfig
    from parallel.config import ParallelConfig
    from parallel.expert import ExpertParallelDispatcher, is_expert_param
    from parallel.grid import BACKENDS, ProcessGrid
    from parallel.zero import ZeroOptimizer
    from tests.conftest import small_config
    from trainer.balance import BiasBalancer
    from trainer.checkpoint import Shard, save_checkpoint
    from trainer.watchdog import _dump_flight_recorder, record_collectives

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    if device == "cuda":
        torch.cuda.set_device(0)
    record_collectives()  # as the trainer does, so that the hang watchdog's dump below has entries
    dist.init_process_group(BACKENDS[device], rank=0, world_size=1)
    grid = ProcessGrid.build(ParallelConfig(gpus_per_node=1), device)
    dev, checked = grid.device, {}
    if device == "cuda":  # parallel.a2a_sms reached NCCL on both EP communicators
        caps = [g._get_backend(dev).options.config.max_ctas for g in (grid.ep_group, grid.ep_bwd_group)]
        assert caps == [20, 20], caps
        checked["a2a_max_ctas"] = caps

    # the expert dispatcher against the experts applied where the tokens are
    torch.manual_seed(0)
    cfg = small_config()
    experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim).to(dev)
    h = torch.randn(64, cfg.dim, device=dev)
    idx = torch.randint(0, cfg.n_routed_experts, (64, cfg.n_activated_experts), device=dev)
    w = torch.rand(64, cfg.n_activated_experts, device=dev)
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = experts(ref_h, idx, ref_w, complete=True)
    ref.square().sum().backward()
    for hierarchical in (False, True):
        for payload in (None, FP8Payload()):
            disp = ExpertParallelDispatcher(grid.ep_group, cfg.n_routed_experts, gpus_per_node=1,
                                            hierarchical=hierarchical, payload=payload, device=dev,
                                            bwd_group=grid.ep_bwd_group)
            hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
            got = disp.dispatch(hx, idx, wx)
            y = experts(got.rows, got.expert_ids, got.weights, got.packed, got.expert_counts)
            out = disp.combine(y, got.layout)
            out.square().sum().backward()
            if payload is None:  # one rank: the rows never leave, so the result is the local experts'
                torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hx.grad, ref_h.grad, rtol=1e-5, atol=1e-5)
            else:  # the rows travel as E4M3
                assert calc_diff(out, ref.detach()) < 5e-3 and calc_diff(hx.grad, ref_h.grad) < 5e-3
            checked[f"dispatcher hierarchical={hierarchical} fp8={payload is not None}"] = disp.stats()["wait_s"]

    # ZeRO-1 over a group of one, its reduce-scatter, all-reduce and all-gather on NCCL
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)).to(dev).to(torch.bfloat16)
    attach_main_grads(model.parameters())
    opt = ZeroOptimizer(model.named_parameters(), OptimConfig(moment_dtype="bf16").validate(), grid.dp_group,
                        grid.edp_group, is_expert_param, extra_group=grid.pp_group, force_collectives=True)
    model(torch.randn(8, 32, device=dev, dtype=torch.bfloat16)).float().square().sum().backward()
    norm = opt.step(1e-3, 1.0)
    assert norm == norm and all(t.device == dev for b in opt.buckets for t in (b.master, b.exp_avg))
    checked["zero_grad_norm"] = norm

    # the metric collectives: device sums over NCCL, host values over gloo, an object broadcast
    sums = torch.arange(4, dtype=torch.float64, device=dev)
    dist.all_reduce(sums, group=grid.pp_group)
    dist.all_reduce(sums, group=grid.dp_group)
    times = [torch.zeros(1, dtype=torch.float64, device="cpu")]
    dist.all_gather(times, torch.tensor([1.5], dtype=torch.float64, device="cpu"))
    box = [str(out_dir)]
    dist.broadcast_object_list(box, src=0)
    checked["metrics"] = [sums.tolist(), times[0].item()]

    # the bias balancer: counts on the device, reduced over NCCL, the report over the pipeline group
    gate_model = torch.nn.ModuleDict({"gate": Gate(cfg)}).to(dev)
    gate_model["gate"](torch.randn(16, cfg.dim, device=dev))
    balancer = BiasBalancer(gate_model, update=True, group=grid.dp_group, report_group=grid.pp_group, device=dev)
    checked["maxvio"] = balancer.step(0.01)["maxvio"]

    # a checkpoint of device tensors (staged to the host by every rank)
    save_checkpoint(out_dir, 1, {"model": {n: Shard.whole(p.detach()) for n, p in model.named_parameters()}},
                    {"step": 1}, keep=1)
    checked["checkpoint"] = sorted(p.name for p in (out_dir / "checkpoints" / "step_00000001").iterdir())

    # the hang watchdog's flight-recorder dump: NCCL's own recorder on GPUs, gloo's generic one for host collectives
    import pickle

    paths, waiting = _dump_flight_recorder(out_dir, 0)
    recorders = {p.name: pickle.loads(p.read_bytes()) for p in paths}
    want = {"hang_gloo_rank_0", "hang_nccl_rank_0"} if device == "cuda" else {"hang_gloo_rank_0"}
    assert set(recorders) == want and waiting is None, (sorted(recorders), waiting)  # every collective completed
    for name, trace in recorders.items():
        kind = name.split("_")[1]
        assert any(e["profiling_name"].startswith(kind + ":") for e in trace["entries"]), name
        assert any(g["ranks"] == "[0]" for g in trace["pg_config"].values()), trace["pg_config"]
    checked["flight_recorder"] = {n: len(t["entries"]) for n, t in recorders.items()}
    dist.barrier()
    dist.destroy_process_group()
    return checked


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), *sys.argv[2:])))
