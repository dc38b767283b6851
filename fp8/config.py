"""FP8Config: the mixed-precision recipe (paper 3.3), the `fp8` group of the run config (configs/fp8/*.yaml).

The recipes: `off` (bf16/fp32 GEMMs), `emulate` (the FP8 recipe with the exact CPU reference GEMM of fp8/gemm.py:
the numerics of FP8 training on any machine), `hopper` (the same recipe on a Hopper GPU's FP8 tensor cores). A GEMM
backend that is not available on this machine fails when the model is built, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Config, ConfigError, DType, choice

Recipe = choice("Recipe", "off emulate hopper", __name__)
GemmBackend = choice("GemmBackend", "auto emulate torch te deepgemm", __name__)


@dataclass
class FP8Config(Config):
    prefix = "fp8"

    recipe: Recipe = Recipe("off")  # off | emulate | hopper
    backend: GemmBackend = GemmBackend("auto")  # FP8 GEMM (fp8/gemm.py): auto = emulate for emulate, torch for hopper
    pow2_scales: bool = True  # power-of-two scales (exact to apply; the paper's choice) or fp32 amax / 448
    dispatch: bool = True  # FP8 payload for the MoE dispatch (uint8 + scales); the combine stays in bf16
    e5m6_cache: bool = True  # the Linear after attention caches its input in E5M6 (fp8/e5m6.py) instead of E4M3
    # AdamW moments while FP8 is on (the paper's bf16; RunConfig.resolved puts it in optim.moment_dtype); null:
    # keep optim.moment_dtype
    moment_dtype: DType | None = DType("bf16")

    def validate(self) -> FP8Config:
        if self.recipe == "emulate" and self.backend not in ("auto", "emulate"):
            raise ConfigError(f"fp8.recipe=emulate runs the CPU reference GEMM; fp8.backend={self.backend!r} belongs "
                              "to fp8.recipe=hopper (or set fp8.backend=auto)")
        if self.recipe == "hopper" and self.backend == "emulate":
            raise ConfigError("fp8.recipe=hopper with fp8.backend=emulate: use fp8.recipe=emulate for the reference "
                              "GEMM, or a GPU backend (auto, torch, te, deepgemm)")
        for key in ("pow2_scales", "dispatch", "e5m6_cache"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"fp8.{key}={getattr(self, key)!r}: must be true or false")
        return self

    @property
    def enabled(self) -> bool:
        return self.recipe != "off"

    def gemm_backend(self) -> str:
        """The fp8/gemm.py backend this recipe runs."""
        if self.backend != "auto":
            return str(self.backend)
        return "emulate" if self.recipe == "emulate" else "torch"
