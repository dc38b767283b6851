"""The token-boundary fix of paper 4.1: the pretokenizer makes tokens that merge punctuation with line breaks (".\n",
"):\n\n"), which bias the model on prompts that end without the line break; a share of them
(`data.split_combined_rate`) is split at random into their punctuation and line-break parts during training.

`combined_tokens` finds such tokens in a vocabulary and what each splits into (each part encoded alone);
`split_combined` applies the split to a packed training sample, keyed by the sample's global index so that the
result does not depend on the layout and a resumed run sees the same tokens. A split makes the sample longer: it
is cut back to its length (the tail moves into no other sample: the packing stays the same).
"""

from __future__ import annotations

import string

import numpy as np

from data.tokenizer import Tokenizer

_PUNCTUATION = set(string.punctuation)
_BREAKS = set("\r\n")


def _parts(text: str) -> list[str] | None:
    """["<punctuation>", "<line breaks and spaces>"] (in order, runs kept) when `text` is punctuation joined with
    line breaks, else None."""
    if not (_BREAKS & set(text)) or not (_PUNCTUATION & set(text)):
        return None
    if any(c not in _PUNCTUATION and not c.isspace() for c in text):
        return None
    runs, kind = [], None
    for c in text:
        k = c in _PUNCTUATION
        if k == kind:
            runs[-1] += c
        else:
            runs.append(c)
            kind = k
    return runs if len(runs) > 1 else None


def combined_tokens(tokenizer: Tokenizer) -> dict[int, list[int]]:
    """Token id -> the ids its punctuation and line-break parts encode to alone, for every merged token."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.fim_begin_id, tokenizer.fim_hole_id,
               tokenizer.fim_end_id}
    table = {}
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        parts = _parts(tokenizer.decode([i]))
        if parts is None:
            continue
        pieces = [j for part in parts for j in tokenizer.encode(part)]
        if len(pieces) > 1 and i not in pieces:
            table[i] = pieces
    return table


def split_combined(sample: np.ndarray, table: dict[int, list[int]], rate: float,
                   rng: np.random.Generator) -> np.ndarray:
    """`sample` with each merged token replaced by its parts with probability `rate`, cut to its length."""
    if rate <= 0 or not table:
        return sample
    ids = np.fromiter(table, dtype=sample.dtype, count=len(table))
    hit = np.flatnonzero(np.isin(sample, ids) & (rng.random(len(sample)) < rate))
    if not len(hit):
        return sample
    out, last = [], 0
    for p in hit.tolist():
        out.append(sample[last:p])
        out.append(np.asarray(table[int(sample[p])], dtype=sample.dtype))
        last = p + 1
    out.append(sample[last:])
    return np.concatenate(out)[: len(sample)]
