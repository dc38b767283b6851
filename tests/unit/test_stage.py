"""Pipeline stages (parallel/pipeline/stage.py): the layer split, what each rank keeps, which ranks share a
parameter, and a stage-by-stage forward equal to the whole model's."""

from __future__ import annotations

import pytest
import torch

from model import ConfigError, Transformer
from parallel.pipeline.schedule import make_schedule
from parallel.pipeline.stage import MicroBatch, holders, keep_stages, rank_stages, split_layers, stage_forward
from tests.conftest import small_config


def test_even_split_puts_larger_blocks_in_the_middle():
    counts = [len(r) for r in split_layers(61, 16)]
    assert sum(counts) == 61 and counts.count(4) == 13 and counts[0] == counts[-1] == 3
    assert [len(r) for r in split_layers(6, 4)] == [1, 2, 2, 1]
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert [len(r) for r in split_layers(2, 4)] == [0, 1, 1, 0]  # stages without layers are allowed
    assert split_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]


@pytest.mark.parametrize("counts", [[1, 1], [3, 1, 1], [-1, 6]])
def test_explicit_split_that_does_not_fit_names_the_key(counts):
    with pytest.raises(ConfigError, match=r"parallel.stage_layers=.*model.n_layers=5"):
        split_layers(5, 2, counts)


def test_ranks_keep_their_stages_and_share_embedding_and_head_as_the_paper_places_them():
    n_layers = 8
    # dualpipev: rank 0 runs stages 0 and 2PP-1, so embedding, head and MTP sit on one rank
    specs = rank_stages(make_schedule("dualpipev", 2), 0, n_layers)
    assert [s.index for s in specs] == [0, 3] and specs[0].first and specs[1].last
    model = keep_stages(Transformer(small_config(n_layers=n_layers)), specs)
    assert sorted(model.layers) == ["0", "1", "6", "7"] and model.embed is not None and model.head is not None
    middle = keep_stages(Transformer(small_config(n_layers=n_layers)),
                         rank_stages(make_schedule("dualpipev", 2), 1, n_layers))
    assert middle.embed is None and middle.head is None and middle.mtp is None
    # 1f1b: the last rank keeps the embedding only because MTP embeds the future tokens
    last = keep_stages(Transformer(small_config(n_layers=4)), rank_stages(make_schedule("1f1b", 2), 1, 4))
    assert last.embed is not None and last.head is not None
    no_mtp = keep_stages(Transformer(small_config(n_layers=4, n_mtp_depth=0)),
                         rank_stages(make_schedule("1f1b", 2), 1, 4))
    assert no_mtp.embed is None
    # who sums which gradients: dualpipe's mirror pairs hold the same stages; 1f1b shares only the embedding
    h = holders(make_schedule("dualpipe", 4), 8, None, mtp=True)
    assert h["layers.0"] == [0, 3] and h["layers.2"] == [1, 2] and h["embed"] == [0, 3] and h["head"] == [0, 3]
    h = holders(make_schedule("1f1b", 4), 8, None, mtp=True)
    assert h["embed"] == [0, 3] and h["head"] == [3] and h["layers.5"] == [2]
    assert holders(make_schedule("dualpipev", 4), 8, None, mtp=True)["embed"] == [0]


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_stages_in_sequence_equal_the_whole_model(schedule):
    cfg = small_config(n_layers=5)
    torch.manual_seed(0)
    whole = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    labels = torch.randint(0, cfg.vocab_size, (2, 8))
    ref = whole.loss(tokens, labels, mtp_lambda=0.3)
    n = make_schedule(schedule, 2).n_stages
    specs = sorted((s for r in range(2) for s in rank_stages(make_schedule(schedule, 2), r, cfg.n_layers)),
                   key=lambda s: s.index)
    assert [s.index for s in specs] == list(range(n))
    x = None
    for spec in specs:
        x = stage_forward(whole, spec, x, MicroBatch(tokens, labels), mtp_lambda=0.3)
    assert torch.equal(x.loss, ref.loss) and torch.equal(x.main, ref.main)
