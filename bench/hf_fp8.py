"""Converting a ~1B-parameter model to and from DeepSeek's released FP8 format (trainer/hf.py, issue 15), streamed:
peak memory against the size of the largest tensor, not of the model.

A random model of about 1.2B parameters (dim 2048, 8 layers, 12 routed experts of 1408, vocab 32000; MTP
included) is saved as a BF16 Hugging Face directory. Then, each in a fresh process: BF16 -> FP8 release form
(`convert_hf(..., fp8=True)`: `HFReader` feeding `write_hf`, one tensor or expert at a time, 256 MiB output
shards), FP8 -> BF16 (the same, as DeepSeek's `fp8_cast_bf16.py` is used), and `load_hf` of the FP8 directory
into a whole fp32 model (for scale: that one must hold the model). Reported: peak RSS over the process's RSS
before the conversion started, against the largest tensor in fp32 (what one conversion step holds) and the
model, the output's size and the wall time.

    python -m bench.hf_fp8   # prints the table, writes bench/results/hf_fp8.json (needs ~8 GB of disk in /tmp)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(vocab_size=32000, dim=2048, n_layers=8, first_k_dense=1, inter_dim=5632, n_heads=16, q_lora_rank=768,
              kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=12,
              n_shared_experts=1, n_activated_experts=4, moe_inter_dim=1408, n_group=1, topk_group=1,
              n_mtp_depth=1, max_seq_len=4096)
MiB = 2**20
SHARD = 256 * MiB  # output shards (DeepSeek's release: ~4.3 GB each; trainer.hf.SHARD_BYTES = 4 GiB)

_CHILD = """
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from trainer.hf import HFReader, convert_hf, load_hf
mode, src, dst = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
def status(key):  # kB; VmHWM is this address space's peak (getrusage's maxrss survives exec from the parent)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))
HFReader(src)  # torch's and safetensors' one-off lazy initialisation (~70 MB), not the conversion's
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS now
base = status("VmRSS")
t0 = time.perf_counter()
held = 0
if mode == "load":
    model = load_hf(src)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
else:
    convert_hf(src, dst, fp8=(mode == "to_fp8"), shard_bytes=int(sys.argv[4]))
print(json.dumps({"base_mib": base / 1024, "peak_mib": status("VmHWM") / 1024,
                  "seconds": time.perf_counter() - t0, "held_mib": held / 2**20}))
"""


def _child(mode: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(dst), str(SHARD)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def main() -> None:
    import torch

    from model import Transformer
    from model.config import ModelConfig
    from trainer.hf import save_hf

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hf_fp8_"))
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(**CONFIG).validate()
        model = Transformer(cfg).to(torch.bfloat16)
        state = model.state_dict()
        params = sum(t.numel() for t in state.values())
        largest = max((t[0] if ".experts." in n else t).numel() for n, t in state.items()) * 4
        save_hf(model, work / "bf16")
        del model, state
        rows = []
        for mode, src, dst in (("to_fp8", "bf16", "fp8"), ("to_bf16", "fp8", "back"), ("load", "fp8", "")):
            r = _child(mode, work / src, work / dst)
            r.update(mode=mode, grown_mib=r["peak_mib"] - r["base_mib"],
                     out_mib=_size(work / dst) / MiB if dst else None)
            rows.append(r)
        result = {"params": params, "model_bf16_mib": 2 * params / MiB, "largest_fp32_mib": largest / MiB,
                  "rows": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{params / 1e9:.2f}B parameters, {result['model_bf16_mib']:.0f} MiB in BF16; largest tensor "
          f"{result['largest_fp32_mib']:.0f} MiB in fp32")
    print(f"{'conversion':34} {'peak RSS over start':>20} {'/ largest':>10} {'output':>10} {'time':>8}")
    names = {"to_fp8": "BF16 -> FP8 release (streamed)", "to_bf16": "FP8 release -> BF16 (streamed)",
             "load": "load_hf(FP8) into an fp32 model"}
    for r in rows:
        out = f"{r['out_mib']:.0f} MiB" if r["out_mib"] is not None else "-"
        held = f" (holds a {r['held_mib']:.0f} MiB model)" if r["held_mib"] else ""
        print(f"{names[r['mode']]:34} {r['grown_mib']:>16.0f} MiB {r['grown_mib'] / result['largest_fp32_mib']:>9.2f}x "
              f"{out:>10} {r['seconds']:>7.1f}s{held}")
    (RESULTS / "hf_fp8.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
