"""Conversion to and from Hugging Face's DeepseekV3 format (config.json + safetensors).

`save_hf` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as
DeepseekV3ForCausalLM; `load_hf` reads such a directory (one file or a sharded index) back into a
`Transformer`. MTP module k is stored as decoder layer `num_hidden_layers + k`, with `enorm`, `hnorm`,
`eh_proj`, `shared_head.norm` and copies of the shared embedding and head, where DeepSeek's own checkpoint
puts them; transformers ignores that layer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.config import ConfigError
from model.config import ModelConfig, YarnConfig
from model.transformer import Transformer

log = logging.getLogger(__name__)

# our name suffix inside a block  <->  HF name suffix inside a decoder layer
_ATTN = {"attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
         "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
         "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj", "attn.wo": "self_attn.o_proj",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of a DeepseekV3ForCausalLM with the same architecture."""
    rope_scaling = None
    if cfg.yarn is not None:
        y = cfg.yarn
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast,
                        "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                        "original_max_position_embeddings": y.original_max_seq_len}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "num_experts_per_tok": cfg.n_activated_experts, "first_k_dense_replace": cfg.first_k_dense,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "num_nextn_predict_layers": cfg.n_mtp_depth, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def config_from_hf(hf: dict, path: Path) -> ModelConfig:
    """ModelConfig from a DeepseekV3 config.json; other architectures or unsupported options fail by name."""
    if hf.get("model_type") != "deepseek_v3":
        raise ConfigError(f"{path}: model_type={hf.get('model_type')!r} (architectures {hf.get('architectures')}) "
                          "is not a DeepseekV3 checkpoint; only model_type 'deepseek_v3' can be loaded")
    unsupported = {"hidden_act": "silu", "norm_topk_prob": True, "attention_bias": False, "rope_interleave": True,
                   "tie_word_embeddings": False, "scoring_func": "sigmoid"}
    for key, want in unsupported.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"{path}: {key}={hf[key]!r} is not supported (DeepSeek-V3 uses {want!r})")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise ConfigError(f"{path}: num_key_value_heads must equal num_attention_heads for MLA")
    yarn = None
    rs = hf.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "yarn":
            raise ConfigError(f"{path}: rope_scaling type {kind!r} is not supported; only 'yarn'")
        yarn = YarnConfig(factor=float(rs["factor"]), beta_fast=float(rs.get("beta_fast") or 32),
                          beta_slow=float(rs.get("beta_slow") or 1), mscale=float(rs.get("mscale") or 0),
                          mscale_all_dim=float(rs.get("mscale_all_dim") or 0),
                          original_max_seq_len=int(rs.get("original_max_position_embeddings")
                                                   or hf["max_position_embeddings"]))
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        first_k_dense=hf["first_k_dense_replace"], inter_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.006),
        max_seq_len=hf["max_position_embeddings"], n_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=hf.get("rope_theta", 10000.0), yarn=yarn,
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf["num_experts_per_tok"], n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, moe_inter_dim=hf["moe_intermediate_size"],
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        n_mtp_depth=hf.get("num_nextn_predict_layers", 0) or 0,
    ).validate()


def _block_names(ours: str, hf: str, block) -> dict[str, str]:
    """Map our tensor names of one block to HF's (experts handled separately)."""
    present = {n for n, _ in block.named_parameters()} | {n for n, _ in block.named_buffers()}
    names = {f"{ours}.{s}.weight": f"{hf}.{h}.weight" for s, h in _ATTN.items() if f"{s}.weight" in present}
    if not block.is_moe:
        for w, h in _MLP.items():
            names[f"{ours}.ffn.{w}.weight"] = f"{hf}.mlp.{h}.weight"
        return names
    names[f"{ours}.ffn.gate.weight"] = f"{hf}.mlp.gate.weight"
    names[f"{ours}.ffn.gate.bias"] = f"{hf}.mlp.gate.e_score_correction_bias"
    if block.ffn.shared_experts is not None:
        for w, h in _MLP.items():
            names[f"{ours}.ffn.shared_experts.{w}.weight"] = f"{hf}.mlp.shared_experts.{h}.weight"
    return names


def _layout(model: Transformer):
    """Yield (our block prefix, HF layer prefix, block) for every block, MTP included."""
    for i, block in model.layers.items():
        yield f"layers.{i}", f"model.layers.{i}", block
    for k, module in enumerate(model.mtp or []):
        yield f"mtp.{k}.block", f"model.layers.{model.cfg.n_layers + k}", module.block


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["norm.weight"],
           "lm_head.weight": ours["head.weight"]}
    for prefix, hf_prefix, block in _layout(model):
        for name, hf_name in _block_names(prefix, hf_prefix, block).items():
            out[hf_name] = ours[name]
        if block.is_moe:
            for w, h in _MLP.items():
                stacked = ours[f"{prefix}.ffn.experts.{w}.weight"]
                for e in range(stacked.shape[0]):
                    out[f"{hf_prefix}.mlp.experts.{e}.{h}.weight"] = stacked[e]
    for k, _ in enumerate(model.mtp or []):
        hf_prefix = f"model.layers.{model.cfg.n_layers + k}"
        for ours_name, hf_name in _MTP.items():
            out[f"{hf_prefix}.{hf_name}.weight"] = ours[f"mtp.{k}.{ours_name}.weight"]
        out[f"{hf_prefix}.embed_tokens.weight"] = ours["embed.weight"]  # shared, stored as DeepSeek does
        out[f"{hf_prefix}.shared_head.head.weight"] = ours["head.weight"]
    return {n: t.detach().contiguous().clone() for n, t in out.items()}


def save_hf(model: Transformer, path: str | Path) -> None:
    """Write config.json and model.safetensors for transformers' DeepseekV3ForCausalLM."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.head.weight.dtype
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype), indent=2) + "\n")
    save_file(to_hf_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (nor model.safetensors.index.json)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path / name}: not a readable safetensors file ({err})") from err
    return tensors


def load_hf(path: str | Path) -> Transformer:
    """A Transformer from a DeepseekV3 directory (config.json + safetensors). Missing tensors are listed.

    A directory without any MTP tensors (for example one re-saved by transformers, which drops them)
    loads with `n_mtp_depth = 0`.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; a Hugging Face model directory needs config.json")
    cfg = config_from_hf(json.loads(config_file.read_text()), path)
    tensors = _read_tensors(path)
    mtp_prefixes = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(cfg.n_mtp_depth))
    if cfg.n_mtp_depth and not any(n.startswith(mtp_prefixes) for n in tensors):
        log.warning("%s: num_nextn_predict_layers=%d but no MTP tensors; loading without MTP", path, cfg.n_mtp_depth)
        cfg.n_mtp_depth = 0
    model = Transformer(cfg)
    wanted = to_hf_state_dict(model)
    shared_copies = {n for n in wanted if n.endswith((".shared_head.head.weight", ".embed_tokens.weight"))
                     and n.startswith(mtp_prefixes)}
    missing = sorted(n for n in wanted if n not in tensors and n not in shared_copies)
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise KeyError(f"{path}: checkpoint lacks tensors the config needs: {shown}")
    if cfg.n_shared_experts == 0:  # transformers writes empty shared-expert tensors for n_shared_experts=0
        tensors = {n: t for n, t in tensors.items() if not (".mlp.shared_experts." in n and t.numel() == 0)}
    unexpected = sorted(n for n in tensors if n not in wanted)
    if unexpected:
        raise KeyError(f"{path}: tensors the config does not describe (another architecture or config?): "
                       + ", ".join(unexpected[:20]))
    for n in wanted:
        if n in tensors and tensors[n].shape != wanted[n].shape:
            raise ValueError(f"{path}: tensor {n} has shape {tuple(tensors[n].shape)}, the config needs "
                             f"{tuple(wanted[n].shape)}")
    model.load_state_dict(from_hf_state_dict(model, tensors))
    return model


def from_hf_state_dict(model: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"embed.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"],
           "head.weight": tensors["lm_head.weight"]}
    for prefix, hf_prefix, block in _layout(model):
        for name, hf_name in _block_names(prefix, hf_prefix, block).items():
            out[name] = tensors[hf_name]
        if block.is_moe:
            n_experts = block.ffn.experts.n_experts
            for w, h in _MLP.items():
                out[f"{prefix}.ffn.experts.{w}.weight"] = torch.stack(
                    [tensors[f"{hf_prefix}.mlp.experts.{e}.{h}.weight"] for e in range(n_experts)])
    for k, _ in enumerate(model.mtp or []):
        hf_prefix = f"model.layers.{model.cfg.n_layers + k}"
        for ours_name, hf_name in _MTP.items():
            out[f"mtp.{k}.{ours_name}.weight"] = tensors[f"{hf_prefix}.{hf_name}.weight"]
    dtype = {n: p.dtype for n, p in model.state_dict().items()}
    return {n: t.to(dtype[n]) for n, t in out.items()}
