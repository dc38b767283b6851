"""Model presets: configs/model/NAME.yaml, each mirroring ModelConfig field for field."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from model.config import ConfigError, ModelConfig, model_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


def names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load(name: str, **overrides: object) -> ModelConfig:
    """The validated ModelConfig of preset `name` (configs/model/NAME.yaml), with optional field overrides."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model preset {name!r} does not exist; available presets: {', '.join(names())}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.pop("defaults", None)
    values.update(overrides)
    return model_config(values)
