"""Byte-level BPE tokenizer (paper 4.1: DeepSeek-V3 uses a byte-level BPE with 128K tokens).

A thin wrapper around Hugging Face `tokenizers`: ByteLevel pre-tokenizer and decoder (every byte string has
an encoding, decode(encode(text)) == text), a BPE model trained here by `BpeTrainer`, and six special tokens
that the data pipeline needs as single ids. Literal special-token text inside a document ("<|eos|>" written in
a source file) is encoded as ordinary text, never as the special id, so documents cannot forge boundaries.

    tok = Tokenizer.train(texts, vocab_size=8192); tok.save("tokenizer.json"); tok = Tokenizer.load(path)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, FIM_BEGIN, FIM_HOLE, FIM_END)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens


class Tokenizer:
    """A byte-level BPE tokenizer whose special tokens are guaranteed to exist as single ids."""

    def __init__(self, hf: HFTokenizer, source: str = "<in memory>"):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise DataError(f"{source}: the tokenizer lacks the special tokens {', '.join(missing)}; "
                            "use a tokenizer trained by data.tokenizer.Tokenizer.train (or hai-data --train-vocab)")
        hf.encode_special_tokens = True  # "<|eos|>" inside a document is text, not the separator
        self._hf = hf
        self.source = source
        ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids[FIM_BEGIN], ids[FIM_HOLE], ids[FIM_END]

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE of at most `vocab_size` entries (fewer if the text has too few pairs)."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: a byte-level BPE needs at least {MIN_VOCAB} entries "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf, source=f"<trained, vocab {vocab_size}>")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found; give an existing tokenizer.json (data.tokenizer, "
                            "hai-data --tokenizer), or write one with hai-data --train-vocab N")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for unparsable files
            raise DataError(f"{path}: not a tokenizer.json ({err}); point data.tokenizer at a file written by "
                            "Tokenizer.save or hai-data --train-vocab") from None
        return cls(hf, source=str(path))

    @classmethod
    def from_str(cls, json_text: str, source: str = "<json>") -> Tokenizer:
        return cls(HFTokenizer.from_str(json_text), source=source)

    def save(self, path: str | Path) -> None:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(Path(path).expanduser()))

    def to_str(self) -> str:
        return self._hf.to_str()

    # ---- use ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> bytes:
        """16 bytes identifying the vocabulary; token files record it to catch a mismatched tokenizer."""
        vocab = sorted(self._hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        text = "\n".join(f"{i}\t{token}" for token, i in vocab)
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"
