"""Hugging Face interop (trainer/hf.py), checked against transformers' own DeepseekV3ForCausalLM.

What is proven:
- `save_hf` writes a directory that `AutoModelForCausalLM` loads as DeepseekV3ForCausalLM computing the
  same logits as our `Transformer` (max abs diff <= 1e-5, fp32, eager attention) over tiny random configs
  with non-trivial routing: low-rank and direct queries, YaRN beyond the original context, one or several
  expert groups, a nonzero router bias, no shared expert, no dense layer. The reference is transformers'
  forward pass on the same weights, never stored numbers.
- `load_hf(save_hf(m))` restores every tensor bit for bit (MTP included) and the same config.
- MTP module k is stored as decoder layer `num_hidden_layers + k`, with DeepSeek's tensor names.
- A directory re-saved by transformers (which drops the MTP layer; sharded here, through the index file)
  loads without MTP and gives bitwise the same logits.
- Bad input fails with the documented error type and a message naming the problem.
- A bf16 model is written as bf16 (router kept in fp32) and reads back to the same values.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError, ModelConfig, YarnConfig
from model.transformer import Transformer
from trainer.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the MTP layer is "not used" by transformers, by design

VOCAB = 96
BASE = dict(vocab_size=VOCAB, dim=48, n_layers=3, first_k_dense=1, inter_dim=64, init_std=0.1, max_seq_len=64,
            n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_group=4, topk_group=2,
            moe_inter_dim=16, routed_scaling_factor=2.5, n_mtp_depth=1)
# rope_theta 100 with 8 rotary pairs and an original context of 32 puts the YaRN ramp across pairs 0..3, so
# extrapolated, blended and interpolated frequencies all occur; sequences of 40 run past the original context.
YARN = dict(rope_theta=100.0, qk_rope_head_dim=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the threads' contention
    makes this module several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def build(cfg: ModelConfig, seed: int = 0, router_bias: bool = False) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if router_bias:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("ffn.gate.bias"):
                    buf.uniform_(-0.05, 0.05)
    return model


def tokens(seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(seed))


def load_reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# name: (config overrides, sequence length, router bias)
CASES = {
    "plain": ({}, 32, False),
    "yarn": (dict(YARN, yarn=YarnConfig(factor=4, original_max_seq_len=32, mscale=0.707, mscale_all_dim=1.0)),
             40, False),
    "direct_query": (dict(q_lora_rank=None), 32, False),
    "one_group": (dict(n_group=1, topk_group=1, n_activated_experts=3), 32, False),
    "router_bias": ({}, 32, True),
    "no_shared_experts": (dict(n_shared_experts=0), 24, False),
    "all_moe": (dict(first_k_dense=0), 32, True),
    # transformers scales cos/sin by 0.1 ln(s) + 1 when mscale_all_dim is 0
    "yarn_mscale_all_dim_0": (
        dict(YARN, yarn=YarnConfig(factor=4, original_max_seq_len=32, mscale=0.707, mscale_all_dim=0.0)), 40, False),
    # the MLA latent norms keep eps 1e-6 whatever rms_norm_eps is
    "norm_eps_1e-3": (dict(norm_eps=1e-3), 32, False),
}
PARAMS = [pytest.param(*v, id=k) for k, v in CASES.items()]


@pytest.mark.parametrize("overrides, seq_len, router_bias", PARAMS)
def test_logits_match_transformers(tmp_path, overrides, seq_len, router_bias):
    model = build(config(**overrides), router_bias=router_bias)
    save_hf(model, tmp_path)
    hf = load_reference(tmp_path)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = tokens(seq_len)
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == ref.shape == (2, seq_len, VOCAB)
    assert max_diff(ours, ref) <= 1e-5
    if router_bias:  # the bias must change which experts are chosen, or this case proves nothing about it
        for name, buf in model.named_buffers():
            if name.endswith("ffn.gate.bias"):
                buf.zero_()
        with torch.no_grad():
            assert max_diff(model(x), ref) > 1e-3


@pytest.mark.parametrize("overrides, router_bias", [
    pytest.param({}, True, id="plain"),
    pytest.param(dict(YARN, yarn=YarnConfig(factor=4, original_max_seq_len=32, mscale=0.707, mscale_all_dim=1.0),
                      q_lora_rank=None, n_shared_experts=0, first_k_dense=0, n_mtp_depth=2), True,
                 id="yarn_direct_query_no_shared_all_moe_mtp2"),
])
def test_round_trip_is_exact(tmp_path, overrides, router_bias):
    model = build(config(**overrides), router_bias=router_bias)
    save_hf(model, tmp_path)
    loaded = load_hf(tmp_path)
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    assert any(n.startswith("mtp.") for n in want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_mtp_is_stored_as_the_layer_after_the_trunk(tmp_path):
    model = build(config())
    save_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    hf_config = json.loads((tmp_path / "config.json").read_text())
    n = hf_config["num_hidden_layers"]
    assert n == 3 and hf_config["num_nextn_predict_layers"] == 1
    mtp = model.mtp[0]
    expect = {"eh_proj.weight": mtp.eh_proj.weight, "enorm.weight": mtp.enorm.weight,
              "hnorm.weight": mtp.hnorm.weight, "shared_head.norm.weight": mtp.norm.weight,
              "shared_head.head.weight": model.head.weight, "embed_tokens.weight": model.embed.weight,
              "self_attn.kv_b_proj.weight": mtp.block.attn.wkv_b.weight,
              "self_attn.q_a_proj.weight": mtp.block.attn.wq_a.weight,
              "input_layernorm.weight": mtp.block.attn_norm.weight,
              "mlp.gate.weight": mtp.block.ffn.gate.weight,
              "mlp.gate.e_score_correction_bias": mtp.block.ffn.gate.bias,
              "mlp.shared_experts.up_proj.weight": mtp.block.ffn.shared_experts.w3.weight,
              "mlp.experts.7.down_proj.weight": mtp.block.ffn.experts.w2.weight[7]}
    for suffix, tensor in expect.items():
        assert torch.equal(tensors[f"model.layers.{n}.{suffix}"], tensor.detach()), suffix
    assert not any(name.startswith(f"model.layers.{n + 1}.") for name in tensors)


def test_transformers_resaved_directory_loads_without_mtp(tmp_path, caplog):
    model = build(config(), router_bias=True)
    save_hf(model, tmp_path / "ours")
    load_reference(tmp_path / "ours").save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded: the index path is read
    with caplog.at_level(logging.WARNING, logger="trainer.hf"):
        loaded = load_hf(tmp_path / "hf")
    assert "no MTP tensors" in caplog.text
    assert loaded.cfg.n_mtp_depth == 0 and len(loaded.mtp) == 0
    x = tokens(32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_transformers_resaved_directory_without_shared_experts_loads(tmp_path):
    model = build(config(n_shared_experts=0))
    save_hf(model, tmp_path / "ours")
    load_reference(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    x = tokens(24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loaded_yarn_config_without_mscale_matches_transformers(tmp_path):
    save_hf(build(config(**YARN, yarn=YarnConfig(factor=4, original_max_seq_len=32))), tmp_path)
    cfg_file = tmp_path / "config.json"
    hf_config = json.loads(cfg_file.read_text())
    hf_config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    cfg_file.write_text(json.dumps(hf_config))
    x = tokens(40)
    with torch.no_grad():
        assert max_diff(load_hf(tmp_path)(x), load_reference(tmp_path)(x).logits) <= 1e-5


# ---- bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved")
    save_hf(build(config()), path)
    return path


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(saved, path)
    return path


def _edit_config(path: Path, **changes) -> None:
    hf_config = json.loads((path / "config.json").read_text())
    hf_config.update(changes)
    (path / "config.json").write_text(json.dumps(hf_config))


def test_other_architecture_is_refused(copy):
    _edit_config(copy, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError) as err:
        load_hf(copy)
    assert "llama" in str(err.value) and "deepseek_v3" in str(err.value)


def test_unsupported_option_is_named(copy):
    _edit_config(copy, hidden_act="gelu")
    with pytest.raises(ConfigError, match="hidden_act"):
        load_hf(copy)


def test_missing_config_json(copy):
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(copy)


def test_missing_tensors_are_listed(copy):
    file = copy / "model.safetensors"
    tensors = load_file(str(file))
    gone = ["model.norm.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
            "model.layers.3.eh_proj.weight"]
    save_file({n: t for n, t in tensors.items() if n not in gone}, str(file))
    with pytest.raises(KeyError) as err:
        load_hf(copy)
    for name in gone:
        assert name in str(err.value)


def test_corrupt_safetensors_names_the_file(copy):
    (copy / "model.safetensors").write_bytes(b"\x17not a safetensors file" * 50)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf(copy)


def test_wrong_shape_names_the_tensor(copy):
    file = copy / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_hf(copy)


# ---- dtypes -----------------------------------------------------------------------------------------------


def test_bf16_model_is_saved_in_bf16(tmp_path):
    model = build(config(), router_bias=True).to(torch.bfloat16)
    for name, module in model.named_modules():  # the router runs in fp32 (model/moe.py); keep it there
        if name.endswith("ffn.gate"):
            module.float()
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    router = {n for n in tensors if ".mlp.gate." in n}
    assert router and all(tensors[n].dtype == torch.float32 for n in router)
    assert all(t.dtype == torch.bfloat16 for n, t in tensors.items() if n not in router)
    # load_hf builds a fresh (fp32) model and casts into it: the values survive exactly
    loaded = load_hf(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name
