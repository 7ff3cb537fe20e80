"""Tokenizers with the attributes megatron.core.datasets reads (vocab_size, eod, pad, unique_identifiers).

`bytes`: every UTF-8 byte is a token (0..255), 256 ends a document: no vocabulary file, no download.
Any other name is the path of a locally installed Hugging Face tokenizer directory (needs `transformers`).
"""
from __future__ import annotations

import os
from typing import List

import numpy


BYTE_VOCAB_SIZE = 258  # 256 bytes, end of document, padding


class ByteTokenizer:
    """Byte-level tokenizer: token = byte value, 256 ends a document, 257 pads (never in the data);
    `reserved_ids` more ids from 258 on that text never produces (the retrieval task's keys and values)."""

    eod = 256
    pad = 257

    def __init__(self, reserved_ids: int = 0):
        self.vocab_size = BYTE_VOCAB_SIZE + reserved_ids
        self.unique_identifiers = {"class": "ByteTokenizer", "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.int32)

    def detokenize(self, token_ids: List[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (no network access)."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ValueError(
                f"data.tokenizer={path!r} is neither 'bytes' nor an existing directory holding a Hugging Face tokenizer"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(
                f"data.tokenizer={path!r} needs the 'transformers' package; install it or use data.tokenizer=bytes"
            ) from None
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eod = self._tokenizer.eos_token_id
        if eod is None:
            raise ValueError(f"the tokenizer in {path!r} has no eos token to end documents with")
        self.eod = eod
        self.vocab_size = len(self._tokenizer)
        self.unique_identifiers = {"class": "HFTokenizer", "path": os.path.abspath(path), "vocab_size": self.vocab_size}

    @property
    def pad(self) -> int:
        pad = self._tokenizer.pad_token_id
        return self.eod if pad is None else pad

    def tokenize(self, text: str) -> numpy.ndarray:
        return numpy.asarray(self._tokenizer.encode(text, add_special_tokens=False), dtype=numpy.int32)

    def detokenize(self, token_ids: List[int]) -> str:
        return self._tokenizer.decode(token_ids)


def build_tokenizer(name: str):
    """'bytes' -> ByteTokenizer; anything else is a local Hugging Face tokenizer directory."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def token_dtype(vocab_size: int):
    """The smallest numpy dtype that holds every token id (what the .bin file stores)."""
    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32
