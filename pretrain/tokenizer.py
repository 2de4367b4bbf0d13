"""The sentencepiece tokenizer as the rest of the project sees it: ids of the special pieces, encode, decode.

data_prep/train_tokenizer.py trains the model with fixed special ids (unk 0, bos 1, eos 2, pad 3); the end of a
document (EOD) is the eos piece. Vocab padding for the embedding table happens in the model, not here.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from pretrain.fileutil import sha256_file


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.pad_id = self.sp.pad_id()
        if self.eod_id < 0:
            raise ValueError(f"{self.path}: the model has no eos piece, which marks the end of a document")

    def sha256(self) -> str:
        return sha256_file(self.path)

    def encode(self, text: str | list[str], *, num_threads: int = 1) -> list[int] | list[list[int]]:
        return self.sp.encode(text, out_type=int, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        """What a manifest or checkpoint records to recognise this tokenizer."""
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256(),
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
        }
