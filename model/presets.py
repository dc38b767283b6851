"""Model presets: configs/model/NAME.yaml (a value for every ModelConfig field), read from the installed `configs`
package, so they work from any directory."""

from __future__ import annotations

from omegaconf import OmegaConf

from configs import ROOT
from core.config import ConfigError
from model.config import ModelConfig, model_config

CONFIG_DIR = ROOT / "model"


def names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def load(name: str, **overrides: object) -> ModelConfig:
    """The validated ModelConfig of preset `name` (configs/model/NAME.yaml), with optional field overrides."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model preset {name!r} does not exist; available presets: {', '.join(names())}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.pop("defaults", None)
    values.update(overrides)
    return model_config(values)
