"""The token-boundary fix (data/boundaries.py, paper 4.1): merged punctuation + line-break tokens are found in a
vocabulary whose pretokenizer makes them, split at `data.split_combined_rate` into what their parts encode to
alone, keyed by the sample's global index (layout-free, resume-exact); the default tokenizer has none."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.boundaries import combined_tokens, split_combined
from data.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXT = "def f(x):\n    return {x: [1, 2]}.\nprint(f(3));\n" * 200


@pytest.fixture(scope="module")
def merging() -> Tokenizer:
    """A byte-level BPE whose pretokenizer keeps punctuation and line breaks together (as DeepSeek-V3's does)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return Tokenizer(hf)


def test_merged_tokens_and_their_parts(merging):
    table = combined_tokens(merging)
    assert table, "the merging pretokenizer makes punctuation + line-break tokens"
    for token, parts in table.items():
        text = merging.decode([token])
        assert "\n" in text and any(c in ".,:;(){}[]" for c in text)
        assert merging.decode(parts) == text and len(parts) > 1  # the same text, in more tokens
        assert not any("\n" in merging.decode([p]) and merging.decode([p]).strip() for p in parts)
    default = Tokenizer.train([TEXT], vocab_size=400)  # GPT-2's split keeps punctuation and line breaks apart
    assert combined_tokens(default) == {}


def test_split_keeps_the_length_and_the_text_prefix(merging):
    table = combined_tokens(merging)
    words = merging.encode("print")
    ids = np.array([t for token in list(table) * 8 for t in (*words, token)][:64], dtype=np.int64)
    text = merging.decode(ids.tolist())
    assert np.array_equal(split_combined(ids, table, 0.0, np.random.default_rng(0)), ids)
    every = split_combined(ids, table, 1.0, np.random.default_rng(0))
    assert len(every) == len(ids) and not np.isin(every, list(table)).any()
    assert text.startswith(merging.decode(every.tolist()))  # the same text, cut to the sample's length
    merged = np.isin(ids, list(table)).sum()
    kept = [np.isin(split_combined(ids, table, 0.5, np.random.default_rng(s))[:32], list(table)).sum()
            for s in range(200)]
    share = np.mean(kept) / np.isin(ids[:32], list(table)).sum()  # merged tokens left among the first 32
    assert merged > 0 and 0.2 < share < 0.8
    again = split_combined(ids, table, 0.5, np.random.default_rng(7))
    assert np.array_equal(again, split_combined(ids, table, 0.5, np.random.default_rng(7)))


def test_the_pipeline_splits_training_samples_by_their_global_index(merging, tmp_path):
    """Two data-parallel ranks read exactly the samples one rank reads, split alike; validation is left as is."""
    from data.config import DataConfig
    from data.dataset import build_data
    from data.preprocess import TokenFileWriter

    path = tmp_path / "tokenizer.json"
    merging.save(path)
    writer = TokenFileWriter(tmp_path / "docs", merging.vocab_size, merging.fingerprint)
    for i in range(60):
        doc = merging.encode(TEXT[i * 37:i * 37 + 300])
        writer.add(np.array(doc), [len(doc)])
    writer.finish()
    cfg = dict(datasets=[str(tmp_path / "docs")], tokenizer=str(path), seq_len=32, fim_rate=0.0, valid_fraction=0.1)
    plain = build_data(DataConfig(**cfg), seed=0)
    split = build_data(DataConfig(**cfg, split_combined_rate=1.0), seed=0)
    table = combined_tokens(merging)
    a, b = plain.next_batch(8)[0], split.next_batch(8)[0]
    assert np.isin(a.numpy(), list(table)).any() and not np.isin(b.numpy(), list(table)).any()
    half = build_data(DataConfig(**cfg, split_combined_rate=0.5), seed=0)
    ranks = [build_data(DataConfig(**cfg, split_combined_rate=0.5), seed=0, dp_rank=r, dp_size=2) for r in range(2)]
    one = half.next_batch(8)[0]
    two = [rank.next_batch(4)[0] for rank in ranks]
    assert all(np.array_equal(one[i].numpy(), two[i % 2][i // 2].numpy()) for i in range(8))
    assert np.array_equal(plain.valid_batches(1, 4)[0][0].numpy(), split.valid_batches(1, 4)[0][0].numpy())
