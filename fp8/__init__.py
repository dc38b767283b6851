"""FP8 mixed precision (paper 3.3): the quantizers, the E5M6 format, the FP8 GEMMs, the FP8 strategy of the model's
Linears and the recipe that installs it from outside (`fp8.recipe.apply_fp8`). The model never imports this."""
