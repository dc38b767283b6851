"""FP8Config: the mixed-precision recipe (paper 3.3). Mirrored by configs/fp8/*.yaml.

- recipe: `off` (bf16/fp32 GEMMs), `emulate` (the FP8 recipe with the exact CPU reference GEMM of fp8/gemm.py:
  the numerics of FP8 training on any machine), `hopper` (the same recipe on a Hopper GPU's FP8 tensor cores).
- backend: the GEMM backend (fp8/gemm.py); `auto` = `emulate` for the emulate recipe, `torch` for hopper. A backend
  that is not available on this machine fails when the model is built, with the reason.
- pow2_scales: power-of-two scaling factors (exact to apply; the paper's choice for the dispatch payload and the
  E5M6 cache), or plain fp32 scales amax / 448.
- e5m6_cache: cache the input of the Linear after attention in E5M6 (fp8/e5m6.py) instead of E4M3.
- dispatch: quantise the MoE dispatch payload (and the matching gradient in the combine's backward) to FP8.
- moment_dtype: the AdamW moments' storage while FP8 is on (the paper's bf16; it replaces optim.moment_dtype),
  or null to keep optim.moment_dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError

RECIPES = ("off", "emulate", "hopper")
BACKEND_CHOICES = ("auto", "emulate", "torch", "te", "deepgemm")


@dataclass
class FP8Config:
    recipe: str = "off"  # off | emulate | hopper
    backend: str = "auto"  # auto | emulate | torch | te | deepgemm (fp8/gemm.py)
    pow2_scales: bool = True  # power-of-two scales (exact) or fp32 amax / 448
    dispatch: bool = True  # FP8 payload for the MoE dispatch (uint8 + scales); the combine stays in bf16
    e5m6_cache: bool = True  # the Linear after attention caches its input in E5M6 (paper 3.3)
    moment_dtype: str | None = "bf16"  # AdamW moments while FP8 is on (paper: bf16); null: optim.moment_dtype

    def validate(self) -> FP8Config:
        if self.recipe not in RECIPES:
            raise ConfigError(f"fp8.recipe={self.recipe!r}: choose one of {', '.join(RECIPES)}")
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"fp8.backend={self.backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
        if self.recipe == "emulate" and self.backend not in ("auto", "emulate"):
            raise ConfigError(f"fp8.recipe=emulate runs the CPU reference GEMM; fp8.backend={self.backend!r} belongs "
                              "to fp8.recipe=hopper (or set fp8.backend=auto)")
        if self.recipe == "hopper" and self.backend == "emulate":
            raise ConfigError("fp8.recipe=hopper with fp8.backend=emulate: use fp8.recipe=emulate for the reference "
                              "GEMM, or a GPU backend (auto, torch, te, deepgemm)")
        for key in ("pow2_scales", "dispatch", "e5m6_cache"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"fp8.{key}={getattr(self, key)!r}: must be true or false")
        if self.moment_dtype not in (None, "bf16", "fp32"):
            raise ConfigError(f"fp8.moment_dtype={self.moment_dtype!r}: bf16, fp32 or null (keep optim.moment_dtype)")
        return self

    @property
    def enabled(self) -> bool:
        return self.recipe != "off"

    def gemm_backend(self) -> str:
        """The fp8/gemm.py backend this recipe runs."""
        if self.backend != "auto":
            return self.backend
        return "emulate" if self.recipe == "emulate" else "torch"
