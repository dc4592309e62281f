"""Text tokenizers: a protocol the pipelines use, and a byte-level implementation with special tokens."""

from typing import Protocol, runtime_checkable

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<vision>", "</vision>", "<eof>", "<eov>")
"""The special tokens of [`ByteTokenizer`][data_pipelines.ByteTokenizer], in id order from 256.

Padding, begin/end of sequence, the start/end markers of the vision part, end of frame and end of
video (see [`lwm_sequence`][data_pipelines.lwm_sequence]).
"""


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipelines need of a text tokenizer; wrap a sentencepiece or `tokenizers` model to fit it.

    Ids `0 .. vocab_size - 1`; the special ids are distinct and inside that range. Besides
    [`encode`][data_pipelines.Tokenizer.encode] and [`decode`][data_pipelines.Tokenizer.decode], a
    tokenizer has the int attributes `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `vision_start_id`
    (`<vision>`), `vision_end_id` (`</vision>`), `eof_id` (end of frame) and `eov_id` (end of video).
    The protocol is `runtime_checkable`: `isinstance(x, Tokenizer)` checks that these members exist.
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
        """The ids of `text`, without BOS/EOS.

        **Arguments:**

        - `text`: the string to tokenize.

        **Returns:**

        An int32 NumPy array of shape `[length]`.
        """
        ...

    def decode(self, ids: np.ndarray) -> str:
        """The text of `ids`; special tokens are dropped.

        **Arguments:**

        - `ids`: integer token ids, shape `[length]`.

        **Returns:**

        The decoded string.
        """
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special tokens `<pad> <bos> <eos> <vision> </vision> <eof> <eov>`.

    A [`Tokenizer`][data_pipelines.Tokenizer] without a model file: `vocab_size` is 263 and the
    special ids are `pad_id = 256`, `bos_id = 257`, `eos_id = 258`, `vision_start_id = 259`,
    `vision_end_id = 260`, `eof_id = 261`, `eov_id = 262` (class attributes, in the order of
    [`SPECIAL_TOKENS`][data_pipelines.SPECIAL_TOKENS]). It takes no arguments.

    `decode(encode(s)) == s` for every string `s`. Decoding ids that are not valid UTF-8 (e.g. a
    generated sequence cut inside a character) substitutes U+FFFD rather than raising.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode("a red circle")
    assert ids.dtype == np.int32 and ids.shape == (12,)
    with_specials = np.concatenate([[tok.bos_id], ids, [tok.eos_id]])
    assert tok.decode(with_specials) == "a red circle"  # special tokens are dropped
    assert tok.token_name(tok.eos_id) == "<eos>" and tok.token_name(65) == "<0x41>"
    ```
    """

    vocab_size = 256 + len(SPECIAL_TOKENS)
    pad_id, bos_id, eos_id, vision_start_id, vision_end_id, eof_id, eov_id = range(256, 256 + len(SPECIAL_TOKENS))

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as ids, without BOS/EOS.

        **Arguments:**

        - `text`: the string to tokenize.

        **Returns:**

        An int32 NumPy array of shape `[length]` (one id per byte, so `length` may exceed
        `len(text)`), values in `[0, 256)`.

        **Raises:**

        `TypeError` if `text` is not a `str`.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        """The text of `ids`: special tokens (ids `>= 256`) are dropped, the bytes decoded as UTF-8.

        **Arguments:**

        - `ids`: integer token ids in `[0, vocab_size)`, shape `[length]` (any array-like).

        **Returns:**

        The decoded string; invalid UTF-8 becomes U+FFFD.

        **Raises:**

        `ValueError` if an id lies outside `[0, vocab_size)` (e.g. a vision code id of the LWM
        layout, which starts at `vocab_size`), or `ids` is not a 1-D array of integers.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D array of integers, got shape {ids.shape} and dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_name(self, token_id: int) -> str:
        """A readable name for one id: the special token's name, or the byte as `<0x41>`.

        **Arguments:**

        - `token_id`: an id in `[0, vocab_size)`.

        **Returns:**

        `"<eos>"` etc. for a special id, `"<0xHH>"` (two upper-case hex digits) for a byte.

        **Raises:**

        `ValueError` if `token_id` is not an integer in `[0, vocab_size)`.
        """
        if isinstance(token_id, bool) or not isinstance(token_id, int | np.integer) or not (
                0 <= token_id < self.vocab_size):
            raise ValueError(f"token_id must be an int in [0, {self.vocab_size}), got {token_id!r}")
        return SPECIAL_TOKENS[token_id - 256] if token_id >= 256 else f"<0x{token_id:02X}>"
