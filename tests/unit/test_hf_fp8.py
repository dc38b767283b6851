"""DeepSeek's released FP8 checkpoint format (trainer/hf.py): `save_hf(..., fp8=True)` quantises exactly the tensors
the release quantises, in 128x128 blocks with fp32 `_scale_inv` (tails cut), and `load_hf` / `HFReader` read it
back against a float64 reference of the release's rule (weight = fp8 x scale_inv per block); a scale in another
shard than its weight is found; missing or mis-shaped scales fail naming the tensor; both directions stream
(peak memory measured in a fresh process against a budget). transformers' own loader of the release (its fine-grained
FP8 quantizer, which dequantises at load on a machine without a GPU) reads our export to the same weights, bit for
bit, and logits as `load_hf`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Transformer
from model.config import ModelConfig
from trainer.hf import HFReader, load_hf, released_in_fp8, save_hf

ROOT = Path(__file__).resolve().parents[2]


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=300, dim=160, n_layers=3, first_k_dense=1, inter_dim=200, n_heads=2, q_lora_rank=136,
                kv_lora_rank=72, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                n_shared_experts=1, n_activated_experts=2, moe_inter_dim=136, n_group=1, topk_group=1,
                n_mtp_depth=1, max_seq_len=64)
    return ModelConfig(**{**base, **overrides}).validate()


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(_config())
    with torch.no_grad():
        for name, buf in m.named_buffers():
            if name.endswith("gate.bias"):
                buf.uniform_(-0.1, 0.1)
    return m


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_exactly_the_released_tensors_are_fp8_with_block_scales(model, tmp_path):
    save_hf(model, tmp_path, fp8=True)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]}
    tensors = _all_tensors(tmp_path)
    fp8 = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    n_layers = model.cfg.n_layers
    # the release's rule, written out: every Linear weight inside a decoder layer (the MTP layer's block too)
    linear = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {n for n in tensors if n.startswith("model.layers.") and n.endswith(".weight")
                and n.split(".")[-2] in linear}
    assert fp8 == expected and len(fp8) == len({n for n in fp8 if released_in_fp8(n)})
    assert f"model.layers.{n_layers}.self_attn.o_proj.weight" in fp8  # MTP's block
    assert f"model.layers.{n_layers}.mlp.experts.3.down_proj.weight" in fp8
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                 f"model.layers.{n_layers}.eh_proj.weight", f"model.layers.{n_layers}.enorm.weight",
                 f"model.layers.{n_layers}.shared_head.head.weight", "model.layers.0.input_layernorm.weight"):
        assert tensors[kept].dtype == torch.bfloat16, kept
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for name in fp8:
        scale = tensors[name + "_scale_inv"]
        rows, cols = tensors[name].shape
        assert scale.dtype == torch.float32 and scale.shape == (-(-rows // 128), -(-cols // 128)), name
    assert not any(n.endswith("_scale_inv") and n[: -len("_scale_inv")] not in fp8 for n in tensors)


def _release_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The release's rule in float64: each 128x128 block times its scale_inv; the edge blocks cut."""
    s = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
    return q.double() * s


def test_load_dequantises_as_the_release_says(model, tmp_path):
    save_hf(model, tmp_path, fp8=True)
    raw = _all_tensors(tmp_path)
    # every scale in another shard than its weight, named by the index (DeepSeek's shards do split pairs)
    scales = {n: t for n, t in raw.items() if n.endswith("_scale_inv")}
    save_file({n: t for n, t in raw.items() if n not in scales}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(scales, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    weight_map = {n: f"model-0000{1 + (n in scales)}-of-00002.safetensors" for n in raw}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_hf(tmp_path)
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    got = loaded.state_dict()
    for e in range(4):
        name = f"model.layers.1.mlp.experts.{e}.up_proj.weight"
        want = _release_dequant(raw[name], raw[name + "_scale_inv"]).float()
        assert torch.equal(got["layers.1.ffn.experts.w3.weight"][e], want)
    want = _release_dequant(raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                            raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]).float()
    assert torch.equal(got["layers.0.attn.wkv_a.weight"], want)
    # the quantisation error is the format's: a few percent of each block's largest value at most
    ref = model.state_dict()["layers.0.attn.wkv_a.weight"]
    assert (want - ref).abs().max() <= 0.07 * ref.abs().max()
    assert torch.equal(got["head.weight"], ref_bf16 := model.state_dict()["head.weight"].bfloat16().float()), ref_bf16
    assert torch.equal(got["layers.1.ffn.gate.bias"], model.state_dict()["layers.1.ffn.gate.bias"])  # fp32 kept


def test_missing_or_misshaped_scales_fail_naming_the_weight(model, tmp_path):
    save_hf(model, tmp_path, fp8=True)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    save_file({n: t for n, t in tensors.items() if n != name + "_scale_inv"}, str(file))
    with pytest.raises(KeyError, match=name.replace(".", r"\.") + ".*_scale_inv"):
        HFReader(tmp_path)
    tensors[name + "_scale_inv"] = tensors[name + "_scale_inv"][:, :1].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"_scale_inv has shape"):
        HFReader(tmp_path)


def test_other_quantisation_is_refused(model, tmp_path):
    save_hf(model, tmp_path, fp8=True)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="weight_block_size"):
        HFReader(tmp_path)


_PEAK = """
import json, sys, torch
torch.set_num_threads(1)
from trainer.hf import HFReader, convert_hf
def status(key):  # kB; VmHWM is this address space's peak (getrusage's maxrss survives exec from pytest)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))
HFReader(sys.argv[1])  # torch's and safetensors' one-off lazy initialisation (~70 MB), not the conversion's
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS now
base = status("VmRSS")
convert_hf(sys.argv[1], sys.argv[2], fp8=sys.argv[3] == "1", shard_bytes=4 << 20)
print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM")}))
"""


def test_conversion_streams_within_a_budget(tmp_path):
    """bf16 -> FP8 -> bf16 of a model of ~140 MB whose largest tensor is 4 MB in fp32: each conversion's peak
    memory over its start stays under the largest tensor times a few (the quantiser's fp32 temporaries) plus one
    4 MB output shard, two mapped input files and the allocator's slack, well below the model."""
    torch.manual_seed(0)
    cfg = _config(dim=512, n_layers=10, inter_dim=1024, moe_inter_dim=256, n_routed_experts=16, vocab_size=2048)
    model = Transformer(cfg).to(torch.bfloat16)
    save_hf(model, tmp_path / "bf16", shard_bytes=4 << 20)
    model_bytes = sum(t.numel() * 2 for t in model.state_dict().values())
    largest = max(t[0].numel() if ".experts." in n else t.numel() for n, t in model.state_dict().items()) * 4
    del model
    for src, dst, fp8 in (("bf16", "fp8", "1"), ("fp8", "back", "0")):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / src), str(tmp_path / dst), fp8],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
        peak = json.loads(out.strip().splitlines()[-1])
        grown = (peak["peak_kb"] - peak["base_kb"]) * 1024
        assert grown < 8 * largest + (4 << 20) + 2 * (4 << 20) + (24 << 20), (grown, largest, model_bytes)
        assert grown < model_bytes / 2, (grown, model_bytes)
    assert json.loads((tmp_path / "back" / "config.json").read_text()).get("quantization_config") is None
    back = _all_tensors(tmp_path / "back")  # DeepSeek's fp8_cast_bf16: BF16 everywhere but the router bias
    assert all(t.dtype == (torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16)
               for n, t in back.items())
    fp8 = HFReader(tmp_path / "fp8")
    name = "model.layers.1.mlp.experts.5.gate_proj.weight"
    assert torch.equal(back[name], fp8.hf_tensor(name).bfloat16())
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


# Every FP8 Linear of this model is either one 128x128 block or whole blocks: transformers' CPU path derives the
# block size from the scale grid (rows // scale rows), which is only right then. With cut edge blocks (DeepSeek's
# own kv_a_proj_with_mqa is 576 rows) it raises or applies the scales to the wrong rows, on the release as on ours.
WHOLE_BLOCKS = dict(dim=256, inter_dim=256, n_heads=4, q_lora_rank=128, kv_lora_rank=112, qk_nope_head_dim=16,
                    qk_rope_head_dim=16, v_head_dim=16, moe_inter_dim=128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_loads_the_fp8_export_as_it_loads_the_release(tmp_path, dtype):
    """transformers' own loader of DeepSeek's FP8 release (its fine-grained FP8 quantizer, which on a machine without
    a GPU dequantises the pre-quantised checkpoint at load) reads `save_hf(..., fp8=True)`: every weight it ends with
    equals our `load_hf` of the same directory bit for bit (both dequantise in fp32 and round once), its logits match
    ours, and they differ from the unquantised model's by the format's error, so the FP8 tensors were used."""
    transformers = pytest.importorskip("transformers", minversion="5.0")  # 4.x refuses FP8 without a GPU
    transformers.logging.set_verbosity_error()  # the MTP layer is "not used" by transformers, by design
    torch.manual_seed(0)
    model = Transformer(_config(**WHOLE_BLOCKS))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("gate.bias"):
                buf.uniform_(-0.1, 0.1)
    save_hf(model, tmp_path, fp8=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=dtype)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ours = load_hf(tmp_path).to(dtype)
    theirs, mine = hf.state_dict(), ours.state_dict()
    pairs = {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": mine["layers.0.attn.wkv_a.weight"],
             "model.layers.2.self_attn.o_proj.weight": mine["layers.2.attn.wo.weight"],
             "model.layers.0.mlp.down_proj.weight": mine["layers.0.ffn.w2.weight"],
             "model.layers.1.mlp.shared_experts.up_proj.weight": mine["layers.1.ffn.shared_experts.w3.weight"],
             # transformers stacks the routed experts: gate_up = [gate; up] per expert
             "model.layers.1.mlp.experts.gate_up_proj": torch.cat([mine["layers.1.ffn.experts.w1.weight"],
                                                                   mine["layers.1.ffn.experts.w3.weight"]], 1),
             "model.layers.2.mlp.experts.down_proj": mine["layers.2.ffn.experts.w2.weight"]}
    for name, want in pairs.items():
        assert theirs[name].dtype == want.dtype == dtype and torch.equal(theirs[name], want), name
    if dtype == torch.float32:  # the file's fp32 router bias (a bf16 load rounds it through bf16: transformers' way)
        bias = theirs["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert torch.equal(bias, load_hf(tmp_path).state_dict()["layers.1.ffn.gate.bias"])
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ref, unquantised = ours(x).float(), hf(x).logits.float(), model(x)
    scale = unquantised.abs().max().item()
    assert (got - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 0.015) * scale
    assert (ref - unquantised).abs().max() > 5e-3 * scale  # FP8's rounding is visible: the export was quantised
