"""Conversion to and from Hugging Face's DeepseekV3 format (config.json + safetensors), and DeepSeek's released FP8
form of it.

`save_hf` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as
DeepseekV3ForCausalLM; `load_hf` reads such a directory (one file or a sharded index) back into a `Transformer`;
`HFReader` reads one tensor at a time under our names (what `trainer.init_from` and `load_hf` use). MTP module k
is stored as decoder layer `num_hidden_layers + k`, with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and
copies of the shared embedding and head, where DeepSeek's own checkpoint puts them; transformers ignores that
layer.

The FP8 form (`save_hf(..., fp8=True)`, read by `load_hf` whenever config.json says so): every Linear weight inside
a decoder layer, the MTP layer's block included (attention projections; dense, shared and routed experts' gate, up
and down projections), is `float8_e4m3fn` with a sibling `<name>_scale_inv` (fp32, one per 128 x 128 block, the
tail blocks cut at the matrix edge; weight = fp8 x scale_inv), and config.json carries `quantization_config`
{quant_method: fp8, weight_block_size: [128, 128]}; embeddings, lm_head, norms, the router weight and the MTP
layer's eh_proj, norms and shared head stay BF16, `e_score_correction_bias` fp32 (DeepSeek-V3's
README_WEIGHTS.md). Reading dequantises in fp32; the model rounds to its dtype once, on copy.

Both directions stream: a reader holds one tensor at a time (experts one by one), a writer at most one shard
(`shard_bytes`) plus the tensor being converted, so peak memory does not grow with the model (bench/hf_fp8.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.config import ConfigError
from fp8.quant import dequantize, quantize_128x128
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

BLOCK = 128  # the release's weight_block_size, both ways
FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [BLOCK, BLOCK]}
SCALE = "_scale_inv"  # suffix of a weight's block scales
# the tensors DeepSeek's release stores in FP8: the Linear weights inside a decoder layer (MTP's block included)
_RELEASED_FP8 = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
                           r"|o_proj)|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight")
SHARD_BYTES = 4 * 2**30  # a written shard's size, at most (one larger tensor gets a shard of its own)


def released_in_fp8(hf_name: str) -> bool:
    """Whether DeepSeek's FP8 release stores this tensor in FP8 (with a `_scale_inv` sibling)."""
    return _RELEASED_FP8.fullmatch(hf_name) is not None


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, fp8: bool = False) -> dict:
    """The config.json of a DeepseekV3ForCausalLM with the same architecture (in the FP8 release form)."""
    rope_scaling = None
    if cfg.yarn is not None:
        y = cfg.yarn
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast,
                        "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                        "original_max_position_embeddings": y.original_max_seq_len}
    out = {
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
        "num_nextn_predict_layers": cfg.n_mtp_depth,
        "torch_dtype": "bfloat16" if fp8 else str(dtype).removeprefix("torch."),
    }
    if fp8:
        out["quantization_config"] = dict(FP8_QUANTIZATION)
    return out


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


def _check_fp8_config(hf: dict, path: Path) -> bool:
    """True when config.json declares DeepSeek's FP8 release format; other quantisations fail by name."""
    q = hf.get("quantization_config")
    if not q:
        return False
    if q.get("quant_method") != "fp8" or list(q.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise ConfigError(f"{path}: quantization_config {q} is not supported; only DeepSeek's FP8 release format "
                          f"(quant_method fp8, weight_block_size [{BLOCK}, {BLOCK}])")
    return True


# ---- names ------------------------------------------------------------------------------------------------

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


def hf_names(model: Transformer) -> dict[str, list[str]]:
    """Our state-dict name -> the HF tensors that hold it: one, or one per expert for our stacked routed experts
    (dim 0 of ours). `model` may live on the meta device."""
    out = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"],
           "head.weight": ["lm_head.weight"]}
    for prefix, hf_prefix, block in _layout(model):
        out.update({name: [hf_name] for name, hf_name in _block_names(prefix, hf_prefix, block).items()})
        if block.is_moe:
            for w, h in _MLP.items():
                out[f"{prefix}.ffn.experts.{w}.weight"] = [f"{hf_prefix}.mlp.experts.{e}.{h}.weight"
                                                          for e in range(block.ffn.experts.n_experts)]
    for k, _ in enumerate(model.mtp or []):
        hf_prefix = f"model.layers.{model.cfg.n_layers + k}"
        for ours_name, hf_name in _MTP.items():
            out[f"mtp.{k}.{ours_name}.weight"] = [f"{hf_prefix}.{hf_name}.weight"]
    return out


def _shared_copies(cfg: ModelConfig) -> dict[str, str]:
    """HF name of each MTP layer's copy of the shared embedding and head -> our name (written, never read)."""
    out = {}
    for k in range(cfg.n_mtp_depth):
        hf_prefix = f"model.layers.{cfg.n_layers + k}"
        out[f"{hf_prefix}.embed_tokens.weight"] = "embed.weight"
        out[f"{hf_prefix}.shared_head.head.weight"] = "head.weight"
    return out


# ---- writing ----------------------------------------------------------------------------------------------

class _ShardWriter:
    """safetensors shards of at most `shard_bytes` (a larger tensor gets one of its own), then the index, written
    into a hidden sibling directory and moved into `path` only once complete, so that a failed conversion leaves
    `path` as it was. One shard is named model.safetensors, as transformers writes a small model."""

    def __init__(self, path: Path, shard_bytes: int) -> None:
        self.path, self.shard_bytes = path, shard_bytes
        self.tmp = path.parent / f".{path.name}.partial"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.current: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.shard_bytes:
            self._flush()
        t = tensor.contiguous()
        if t.untyped_storage().nbytes() != nbytes or any(t.data_ptr() == o.data_ptr() for o in self.current.values()):
            t = t.clone()  # safetensors refuses tensors that share storage (an expert of a stack, a shared copy)
        self.current[name] = t
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.current, str(self.tmp / f"shard-{len(self.files):05d}"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.size = {}, 0

    def close(self, config: dict) -> None:
        if self.current or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.tmp / "shard-00000").rename(self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(self.files):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"shard-{i:05d}").rename(self.tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.path.mkdir(parents=True, exist_ok=True)
        for old in [*self.path.glob("model*.safetensors"), self.path / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)  # a previous export's shards, which the new index would not name
        for f in self.tmp.iterdir():
            f.replace(self.path / f.name)
        self.tmp.rmdir()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_hf(path: str | Path, cfg: ModelConfig, tensor: Callable[[str, int | None], torch.Tensor],
             dtype: torch.dtype, fp8: bool = False, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json and safetensors for `cfg`, one tensor at a time: `tensor(our name, expert)` gives our
    tensor (expert e of a stacked routed-expert tensor when `expert` is not None) on the CPU, in any dtype.
    Without `fp8`, `dtype` is config.json's torch_dtype and tensors keep their own dtype; with it, the release
    form (module docstring): the release's FP8 weights quantised in 128 x 128 blocks by our quantiser
    (fp8/quant.py, amax / 448 scales, not powers of two), the rest BF16, the router bias fp32."""
    path = Path(path)
    with torch.device("meta"):
        names = hf_names(Transformer(cfg))
    writer = _ShardWriter(path, shard_bytes)

    def put(hf_name: str, t: torch.Tensor) -> None:
        if not fp8:
            writer.add(hf_name, t)
        elif released_in_fp8(hf_name):
            q, scale = quantize_128x128(t.float(), pow2=False)
            writer.add(hf_name, q)
            writer.add(hf_name + SCALE, scale)
        else:
            writer.add(hf_name, t.float() if hf_name.endswith("e_score_correction_bias") else t.to(torch.bfloat16))

    try:
        for ours, hf_list in names.items():
            if ".ffn.experts." not in ours:
                put(hf_list[0], tensor(ours, None))
            else:
                for e, hf_name in enumerate(hf_list):
                    put(hf_name, tensor(ours, e))
        for hf_name, ours in _shared_copies(cfg).items():
            put(hf_name, tensor(ours, None))
        writer.close(hf_config(cfg, dtype, fp8))
    except BaseException:
        writer.abort()
        raise


def save_hf(model: Transformer, path: str | Path, fp8: bool = False, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json and safetensors for transformers' DeepseekV3ForCausalLM (DeepSeek's FP8 release form
    with `fp8`)."""
    state = model.state_dict()

    def tensor(name: str, expert: int | None) -> torch.Tensor:
        t = state[name].detach()
        return (t if expert is None else t[expert]).cpu()

    write_hf(path, model.cfg, tensor, model.head.weight.dtype, fp8, shard_bytes)


def convert_hf(src: str | Path, dst: str | Path, fp8: bool, shard_bytes: int = SHARD_BYTES) -> None:
    """A DeepseekV3 directory rewritten in the FP8 release form (`fp8`) or in BF16 (DeepSeek's fp8_cast_bf16.py:
    the FP8 weights dequantised and rounded to BF16 once, the router bias kept in fp32), streamed."""
    reader = HFReader(src)

    def tensor(name: str, expert: int | None) -> torch.Tensor:
        t = reader.tensor("model", name) if expert is None else reader.expert(name, expert)
        return t if fp8 or name.endswith("gate.bias") else t.to(torch.bfloat16)

    write_hf(dst, reader.cfg, tensor, torch.bfloat16, fp8=fp8, shard_bytes=shard_bytes)


# ---- reading ----------------------------------------------------------------------------------------------

# safetensors dtype codes -> torch dtypes (the ones a DeepseekV3 directory holds)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def _header(file: Path) -> tuple[int, dict[str, dict]]:
    """(where the data begins, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file: its 8-byte
    little-endian header length, then the JSON header (the format's whole layout)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 * 2**20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return 8 + n, {k: v for k, v in header.items() if {"dtype", "shape", "data_offsets"} <= set(v)}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err


def _index(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, dict[str, dict]]]]:
    """(HF tensor name -> the file holding it, the headers read to know it): from the index file (no header
    read), else from the files' headers (nothing else read)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a readable safetensors index ({err})") from err
        return dict(weight_map), {}
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (nor model.safetensors.index.json)")
    headers = {name: _header(path / name) for name in files}
    return {key: name for name in files for key in headers[name][1]}, headers


class HFReader:
    """A DeepseekV3 directory read one tensor at a time under our names: the interface of trainer/checkpoint.py's
    `CheckpointReader` for its "model" group (`names`, `shape`, `read`, `tensor`), FP8 weights dequantised to
    fp32. Construction reads config.json and the safetensors headers and checks every tensor's presence and
    shape (and each FP8 weight's scales) against the config; nothing else is read until asked."""

    def __init__(self, path: str | Path, metadata: dict | None = None) -> None:
        """`metadata`: another reader's `metadata()` of the same directory, so that nothing is read now (at 2048
        ranks x 163 shards, one rank reads the headers and broadcasts them instead of every rank reading them)."""
        self.path = Path(path)
        if metadata is None:
            config_file = self.path / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file}: missing; a Hugging Face model directory needs config.json")
            hf = json.loads(config_file.read_text())
        else:
            hf = metadata["config"]
        self.cfg = config_from_hf(hf, self.path)
        self.fp8 = _check_fp8_config(hf, self.path)
        self._config = hf
        if metadata is None:
            self._where, self._headers = _index(self.path)
        else:
            self._where = dict(metadata["where"])
            self._headers = {name: (start, entries) for name, (start, entries) in metadata["headers"].items()}
        cfg = self.cfg
        mtp_prefixes = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(cfg.n_mtp_depth))
        if cfg.n_mtp_depth and not any(n.startswith(mtp_prefixes) for n in self._where):
            log.warning("%s: num_nextn_predict_layers=%d but no MTP tensors; loading without MTP", self.path,
                        cfg.n_mtp_depth)
            cfg.n_mtp_depth = 0
        with torch.device("meta"):
            model = Transformer(cfg)
        self._hf = {n: hf_list for n, hf_list in hf_names(model).items()}
        self._shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        self._check()

    def metadata(self) -> dict:
        """Everything construction reads (config.json, which file holds which tensor, every file's header), as
        JSON-serialisable data for `HFReader(path, metadata)` elsewhere."""
        for name in sorted(set(self._where.values())):
            if name not in self._headers:
                self._headers[name] = _header(self.path / name)
        return {"config": self._config, "where": self._where,
                "headers": {name: list(header) for name, header in self._headers.items()}}

    # -- checks
    def _entry(self, hf_name: str) -> tuple[Path, int, dict]:
        """(file, where its data begins, the tensor's header entry)."""
        name = self._where[hf_name]
        if name not in self._headers:
            self._headers[name] = _header(self.path / name)
        start, entries = self._headers[name]
        if hf_name not in entries:
            raise ValueError(f"{self.path / name}: lacks {hf_name}, which model.safetensors.index.json places there")
        return self.path / name, start, entries[hf_name]

    def _meta(self, hf_name: str) -> tuple[tuple[int, ...], str]:
        entry = self._entry(hf_name)[2]
        return tuple(entry["shape"]), entry["dtype"]

    def _check(self) -> None:
        wanted = {hf for hf_list in self._hf.values() for hf in hf_list}
        copies = set(_shared_copies(self.cfg))
        missing = sorted(n for n in wanted if n not in self._where)
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise KeyError(f"{self.path}: checkpoint lacks tensors the config needs: {shown}")
        present = set(self._where)
        if self.cfg.n_shared_experts == 0:  # transformers writes empty shared-expert tensors for n_shared_experts=0
            present = {n for n in present if not (".mlp.shared_experts." in n and math.prod(self._meta(n)[0]) == 0)}
        scales = {n for n in present if n.endswith(SCALE) and n[: -len(SCALE)] in wanted}
        unexpected = sorted(present - wanted - copies - scales)
        if unexpected:
            raise KeyError(f"{self.path}: tensors the config does not describe (another architecture or config?): "
                           + ", ".join(unexpected[:20]))
        for ours, hf_list in self._hf.items():
            want = self._shapes[ours][1:] if len(hf_list) > 1 or ".ffn.experts." in ours else self._shapes[ours]
            for hf_name in hf_list:
                shape, dtype = self._meta(hf_name)
                if shape != tuple(want):
                    raise ValueError(f"{self.path}: tensor {hf_name} has shape {shape}, the config needs {tuple(want)}")
                if dtype == "F8_E4M3":
                    self._check_scale(hf_name, shape)

    def _check_scale(self, hf_name: str, shape: tuple[int, ...]) -> None:
        scale = hf_name + SCALE
        if scale not in self._where:
            raise KeyError(f"{self.path}: {hf_name} is float8_e4m3fn but {scale} is missing; an FP8 weight needs its "
                           f"block scales (one per {BLOCK}x{BLOCK} block)")
        want = tuple(-(-d // BLOCK) for d in shape)
        found = self._meta(scale)[0]
        if found != want:
            raise ValueError(f"{self.path}: {scale} has shape {found}, {hf_name} {shape} needs {want} (one scale per "
                             f"{BLOCK}x{BLOCK} block, tails cut)")

    # -- reading
    def _read(self, hf_name: str) -> torch.Tensor:
        """One stored tensor, read with plain file reads: a memory map (safetensors' safe_open) would keep every
        page it touched resident in this process until the file is closed, so converting one multi-GB shard would
        hold all of it."""
        file, start, entry = self._entry(hf_name)
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: {hf_name} has dtype {entry['dtype']}, not one a DeepseekV3 checkpoint uses")
        a, z = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        if z - a != numel * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"{file}: {hf_name}'s data ({z - a} bytes) does not fit its shape {entry['shape']}")
        buf = bytearray(z - a)
        try:
            with open(file, "rb") as f:
                got = os.preadv(f.fileno(), [buf], start + a)
        except OSError as err:
            raise ValueError(f"{file}: cannot read {hf_name} ({err})") from err
        if got != len(buf):
            raise ValueError(f"{file}: truncated ({hf_name} needs bytes up to {start + z})")
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(entry["shape"])

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """One HF tensor as stored, or dequantised to fp32 if it is an FP8 weight."""
        t = self._read(hf_name)
        if t.dtype == torch.float8_e4m3fn:
            return dequantize(t, self._read(hf_name + SCALE).float(), (BLOCK, BLOCK))
        return t

    def names(self, group: str = "model") -> list[str]:
        self._group(group)
        return list(self._hf)

    def shape(self, group: str, name: str) -> tuple[int, ...]:
        self._group(group)
        return self._shapes[name]

    def read(self, group: str, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of our flattened tensor: of a stacked routed-expert tensor only the experts that
        overlap the range are read."""
        self._group(group)
        shape = self._shapes[name]
        end = math.prod(shape) if end is None else end
        hf_list = self._hf[name]
        if len(hf_list) == 1 and ".ffn.experts." not in name:
            return self.hf_tensor(hf_list[0]).reshape(-1)[start:end]
        per = math.prod(shape[1:])
        first, last = start // per, -(-end // per)
        rows = torch.cat([self.hf_tensor(hf_list[e]).reshape(-1) for e in range(first, last)])
        return rows[start - first * per:end - first * per]

    def tensor(self, group: str, name: str) -> torch.Tensor:
        return self.read(group, name).view(self.shape(group, name))

    def expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e of a stacked routed-expert tensor."""
        return self.hf_tensor(self._hf[name][e])

    def experts(self, name: str) -> Iterator[torch.Tensor]:
        """The experts of a stacked routed-expert tensor, one at a time."""
        for e in range(len(self._hf[name])):
            yield self.expert(name, e)

    def _group(self, group: str) -> None:
        if group != "model":
            raise KeyError(f"{self.path}: a Hugging Face directory holds model weights only, not {group!r}")


def load_hf(path: str | Path) -> Transformer:
    """A Transformer from a DeepseekV3 directory (config.json + safetensors, DeepSeek's FP8 form included), copied
    in one tensor (one expert) at a time. Missing tensors are listed.

    A directory without any MTP tensors (for example one re-saved by transformers, which drops them)
    loads with `n_mtp_depth = 0`.
    """
    reader = HFReader(path)
    model = Transformer(reader.cfg)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if ".ffn.experts." in name:
                for e, expert in enumerate(reader.experts(name)):
                    t[e].copy_(expert)
            else:
                t.copy_(reader.tensor("model", name))
    return model
