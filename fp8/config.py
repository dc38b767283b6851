"""FP8Config: the mixed-precision recipe (paper 3.3). Mirrored by configs/fp8/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError

RECIPES = ("off",)


@dataclass
class FP8Config:
    recipe: str = "off"  # off = bf16/fp32 GEMMs (FP8 recipes are not built yet)

    def validate(self) -> FP8Config:
        if self.recipe not in RECIPES:
            raise ConfigError(f"fp8.recipe={self.recipe!r}: this build supports {RECIPES} (FP8 training is not "
                              "built yet); set fp8.recipe=off")
        return self
