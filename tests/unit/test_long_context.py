"""The long-context stages (paper 4.3): the presets carry the paper's values and continue a previous stage; the
validation loss per position range (trainer.eval_position_buckets) averages back to the validation loss."""

from __future__ import annotations

import math

import pytest

from core.config import ConfigError
from model.rope import softmax_scale
from trainer.config import compose_config, load_config


@pytest.mark.parametrize("name, seq, batch", [("deepseek_v3_ext32k", 32768, 1920),
                                              ("deepseek_v3_ext128k", 131072, 480)])
def test_extension_presets_carry_the_papers_values(name, seq, batch):
    cfg = load_config(compose_config([f"experiment={name}", "trainer.init_from=/runs/previous",
                                      "parallel.pp=1"]), 1)
    y = cfg.model.yarn
    assert (y.factor, y.beta_slow, y.beta_fast, y.original_max_seq_len) == (40, 1, 32, 4096)
    # sqrt(t) = 0.1 ln s + 1 multiplies the attention logits twice over (q and k): softmax scale x (0.1 ln 40 + 1)^2
    assert softmax_scale(cfg.model) == pytest.approx(cfg.model.qk_head_dim ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.trainer.global_batch_size) == (seq, seq, batch)
    assert cfg.trainer.max_steps == 1000 and cfg.optim.lr == cfg.optim.min_lr == 7.3e-6
    assert cfg.optim.warmup_steps == 0 and cfg.optim.constant_tokens > 1000 * batch * seq  # constant throughout
    assert cfg.model.n_layers == 61 and cfg.trainer.init_from == "/runs/previous"


@pytest.mark.parametrize("name", ["tiny_ext", "deepseek_v3_ext32k", "deepseek_v3_ext128k"])
def test_a_stage_that_continues_needs_init_from(name):
    with pytest.raises(ConfigError, match=f"experiment={name} continues .*trainer.init_from="):
        load_config(compose_config([f"experiment={name}", "parallel.pp=1"]), 1)


def test_losses_by_position_average_to_the_validation_loss():
    from parallel.grid import ProcessGrid
    from tests.dist.test_train_parallel import config
    from trainer.train import build, validation

    cfg = config(["trainer.eval_position_buckets=4", "data.seq_len=32", "trainer.eval_batches=2"], 1)
    grid = ProcessGrid.build(cfg.parallel, "cpu")
    run = build(cfg, grid)
    valid = run.data.valid_batches(2, cfg.trainer.micro_batch_size)
    out = validation(grid, run.pipeline, valid, 4)
    assert len(out["val_loss_by_position"]) == 4  # 4 ranges of 8 positions, every label valid: equal weights
    assert sum(out["val_loss_by_position"]) / 4 == pytest.approx(out["val_loss"], rel=1e-6)
    assert len(set(out["val_loss_by_position"])) == 4
