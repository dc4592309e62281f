"""Text tokenizers: a protocol the pipelines use, and a byte-level implementation with special tokens."""

from typing import Protocol, runtime_checkable

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<vision>", "</vision>", "<eof>", "<eov>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipelines need of a text tokenizer; wrap a sentencepiece or `tokenizers` model to fit it.

    Ids `0 .. vocab_size - 1`; the special ids are distinct and inside that range.
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    vision_start_id: int
    vision_end_id: int
    eof_id: int
    eov_id: int

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special tokens `<pad> <bos> <eos> <vision> </vision> <eof> <eov>`.

    `decode(encode(s)) == s` for every string `s`. Decoding ids that are not valid UTF-8 (e.g. a
    generated sequence cut inside a character) substitutes U+FFFD rather than raising.
    """

    vocab_size = 256 + len(SPECIAL_TOKENS)
    pad_id, bos_id, eos_id, vision_start_id, vision_end_id, eof_id, eov_id = range(256, 256 + len(SPECIAL_TOKENS))

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_name(self, token_id: int) -> str:
        """A readable name for one id: the special token's name, or the byte as `<0x41>`."""
        return SPECIAL_TOKENS[token_id - 256] if token_id >= 256 else f"<0x{token_id:02X}>"
