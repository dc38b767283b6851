"""Bad input to the run config, for every group: Hydra composes the structured configs (trainer/config.py), so a
wrongly typed value, an unknown choice, an unknown key or group option stops with one paragraph naming the key,
the value and what is allowed; the same checks apply to plain mappings (`load_config`, `from_dict`)."""

from __future__ import annotations

import dataclasses

import pytest

from core.config import ConfigError, from_dict
from trainer.config import GROUPS, compose_config, load_config
from trainer.train import composition_error

# (override, words the message must hold): a wrong type, an unknown choice, a bad bool, per group
BAD_VALUES = [
    ("model.dim=wide", ["model.dim", "'wide'", "an integer"]),
    ("model.balance=foo", ["model.balance", "'foo'", "aux_free, aux_loss, batch_aux, none"]),
    ("parallel.pp=two", ["parallel.pp", "'two'", "an integer"]),
    ("parallel.schedule=gpipe", ["parallel.schedule", "'gpipe'", "1f1b, zb1p, dualpipe, dualpipev"]),
    ("parallel.overlap=maybe", ["parallel.overlap", "'maybe'", "true or false"]),
    ("fp8.recipe=fast", ["fp8.recipe", "'fast'", "off, emulate, hopper"]),
    ("fp8.moment_dtype=fp16", ["fp8.moment_dtype", "'fp16'", "bf16, fp32"]),
    ("data.seq_len=long", ["data.seq_len", "'long'", "an integer"]),
    ("data.fim_rate=often", ["data.fim_rate", "'often'", "a number"]),
    ("optim.lr=abc", ["optim.lr", "'abc'", "a number"]),
    ("optim.moment_dtype=fp16", ["optim.moment_dtype", "'fp16'", "bf16, fp32"]),
    ("trainer.max_steps=many", ["trainer.max_steps", "'many'", "an integer"]),
    ("trainer.dtype=fp16", ["trainer.dtype", "'fp16'", "auto, bf16, fp32"]),
    ("trainer.device=tpu", ["trainer.device", "'tpu'", "auto, cpu, cuda"]),
    ("logging.wandb=maybe", ["logging.wandb", "'maybe'", "true or false"]),
    ("logging.wandb_mode=cloud", ["logging.wandb_mode", "'cloud'", "offline, online"]),
    ("experiment.name=[a,b]", ["experiment.name", "a string"]),
]


@pytest.mark.parametrize("override,words", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(override, words):
    message = composition_error([override])
    assert message is not None and "\n" not in message
    for word in words:
        assert word in message, message
    with pytest.raises(ConfigError, match=words[0].replace(".", r"\.")):  # hai-launch's and hai-plan's composer
        compose_config([override])


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_an_unknown_key_lists_the_keys_of_its_group(group):
    fields = [f.name for f in dataclasses.fields(GROUPS[group])]
    message = composition_error([f"{group}.bogus=1"])
    assert message is not None and f"{group}.bogus" in message and ", ".join(fields) in message
    # added with '+', Hydra lets it through: loading the composed config refuses it, naming it and the keys
    with pytest.raises(ConfigError, match=rf"{group}: unknown keys \['bogus'\]; its keys are: {', '.join(fields)}"):
        load_config(compose_config([f"+{group}.bogus=1"]))


def test_an_unknown_group_option_lists_the_options():
    message = composition_error(["model=deepseek_v4"])
    assert "model/deepseek_v4" in message and all(n in message for n in ("deepseek_v3_671b", "small", "tiny"))
    assert "search path" not in message


def test_sweeps_and_good_overrides_compose():
    assert composition_error(["-m", "model.balance=aux_free,aux_loss", "trainer.max_steps=2"]) is None
    assert composition_error(["--cfg", "job", "hydra.run.dir=/tmp/x", "optim.lr=1e-3"]) is None
    # YaRN is switched on over a preset's `yarn: null` by giving the mapping, absent fields taking defaults
    cfg = load_config(compose_config(["model.yarn={factor:4,original_max_seq_len:64}"]))
    assert (cfg.model.yarn.factor, cfg.model.yarn.original_max_seq_len, cfg.model.yarn.beta_fast) == (4.0, 64, 32.0)
    fabric = load_config(compose_config(["parallel.fabric={intra_gbps:10,inter_gbps:1}"])).parallel.fabric
    assert (fabric.intra_gbps, fabric.inter_gbps, fabric.latency_us) == (10.0, 1.0, 0.0)


def test_nested_mappings_are_checked_like_groups():
    message = composition_error(["model.yarn.factor=2"])  # yarn is null in the preset
    assert "model.yarn" in message and "model.yarn={" in message
    with pytest.raises(ConfigError, match=r"model\.yarn: unknown keys \['factr'\]; its keys are: factor"):
        load_config(compose_config(["model.yarn={factr:4}"]))
    with pytest.raises(ConfigError, match=r"model\.yarn\.factor='x'.*a number"):
        load_config(compose_config(["model.yarn={factor:x}"]))
    with pytest.raises(ConfigError, match=r"parallel\.fabric: missing \['inter_gbps'\]"):
        load_config(compose_config(["parallel.fabric={intra_gbps:10}"]))


def test_plain_mappings_get_the_same_type_checks():
    with pytest.raises(ConfigError, match=r"optim\.lr='abc'.*optim\.lr takes a number"):
        load_config({"optim": {"lr": "abc"}})
    with pytest.raises(ConfigError, match=r"trainer\.dtype=.fp16. is not a valid choice; choose one of auto, bf16, "
                                          r"fp32"):
        load_config({"trainer": {"dtype": "fp16"}})
    from model.config import ModelConfig

    with pytest.raises(ConfigError, match=r"model: unknown keys \['n_experts'\]"):
        from_dict(ModelConfig, {"n_experts": 4}, "model")


def test_the_run_config_is_validated_once_and_resolved_explicitly():
    cfg = load_config(compose_config(["fp8=emulate", "optim.moment_dtype=fp32"]))
    assert cfg.optim.moment_dtype == "bf16"  # RunConfig.resolved: FP8's bf16 moments replace optim.moment_dtype
    assert cfg.validated_for(1) and not cfg.validated_for(4)
    kept = load_config(compose_config(["fp8=emulate", "fp8.moment_dtype=null", "optim.moment_dtype=fp32"]))
    assert kept.optim.moment_dtype == "fp32"
    with pytest.raises(ConfigError, match="model.n_routed_experts=16 is not divisible by parallel.ep=3"):
        load_config(compose_config(["parallel.ep=3"]), world_size=3)  # the model-versus-layout rule is part of it
