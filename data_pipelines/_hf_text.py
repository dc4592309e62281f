"""Real text: `HFTokenizer` over a Hugging Face `tokenizer.json`, and `text_examples` for training on documents."""

import json
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from ._tokenizer import Tokenizer

VISION_TOKENS = ("<vision>", "</vision>", "<eof>", "<eov>")
"""The tokens LWM added to LLaMA's tokenizer for the vision part, in the order of the `Tokenizer` attributes
`vision_start_id`, `vision_end_id`, `eof_id`, `eov_id`."""


def _token(value) -> str | None:
    """A token as `tokenizer_config.json` gives it: a string, or an added-token dict with its `content`."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A [`Tokenizer`][data_pipelines.Tokenizer] over the `tokenizer.json` of a Hugging Face model folder.

    Runs the folder's tokenizer with the `tokenizers` package (the Rust tokenizer transformers'
    fast tokenizers wrap; no transformers, no torch), so ids are exactly what
    `AutoTokenizer.from_pretrained(folder)` gives without special tokens. The special ids come
    from `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`), else from
    `config.json` (`bos_token_id`, `eos_token_id`, `pad_token_id`; the first of a list). LLaMA-family
    tokenizers have no padding token: `pad_id` is then the unknown token's id, else `eos_id`
    (padding is never a target, so any id serves).

    The vision ids (`vision_start_id`, `vision_end_id`, `eof_id`, `eov_id`) are the ids of
    [`VISION_TOKENS`][data_pipelines.VISION_TOKENS] when the tokenizer has them; with
    `add_vision_tokens=True` missing ones are added as special tokens, as LWM extended LLaMA's
    tokenizer (the model's embedding must then cover the larger `vocab_size`); otherwise they are
    `None` and only text pipelines can use the tokenizer.

    **Example:**

    ```python
    from pathlib import Path

    import models
    from data_pipelines import HFTokenizer, Tokenizer

    # The repository's tiny Llama checkpoint: a byte-level BPE of 96 tokens.
    tokenizer = HFTokenizer(Path(models.__file__).resolve().parents[1] / "tests/fixtures/hf/llama")
    ids = tokenizer.encode("Ring attention")
    assert isinstance(tokenizer, Tokenizer) and tokenizer.decode(ids) == "Ring attention"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vision_start_id) == (1, 2, None)
    ```
    """

    def __init__(self, directory: str | Path, *, add_vision_tokens: bool = False):
        """**Arguments:**

        - `directory`: the model folder holding `tokenizer.json`.
        - `add_vision_tokens`: add missing vision tokens (default `False`).

        **Raises:** `FileNotFoundError` naming `tokenizer.json` if it is missing; `ValueError` naming
        the file and key when no BOS or EOS token can be found.
        """
        from tokenizers import AddedToken, Tokenizer as RustTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: HFTokenizer reads a fast tokenizer's tokenizer.json")
        self._tokenizer = RustTokenizer.from_file(str(path))
        settings = {}
        for name in ("tokenizer_config.json", "config.json"):
            file = directory / name
            settings[name] = json.loads(file.read_text()) if file.is_file() else {}

        def special(role: str) -> int | None:
            token = _token(settings["tokenizer_config.json"].get(f"{role}_token"))
            if token is not None and self._tokenizer.token_to_id(token) is not None:
                return self._tokenizer.token_to_id(token)
            value = settings["config.json"].get(f"{role}_token_id")
            return value[0] if isinstance(value, list) and value else value

        for role in ("bos", "eos"):
            if special(role) is None:
                raise ValueError(f"{directory}: no {role.upper()} token: tokenizer_config.json has no {role}_token in "
                                 f"the vocabulary and config.json no {role}_token_id")
        self.bos_id, self.eos_id = special("bos"), special("eos")
        self.pad_id = next(i for i in (special("pad"), special("unk"), self.eos_id) if i is not None)
        if add_vision_tokens:
            missing = [t for t in VISION_TOKENS if self._tokenizer.token_to_id(t) is None]
            self._tokenizer.add_special_tokens([AddedToken(t, special=True) for t in missing])
        (self.vision_start_id, self.vision_end_id, self.eof_id,
         self.eov_id) = (self._tokenizer.token_to_id(t) for t in VISION_TOKENS)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """The ids of `text`, without BOS/EOS.

        **Arguments:**

        - `text`: the string to tokenize.

        **Returns:** an int32 NumPy array of shape `[length]`.

        **Raises:** `TypeError` if `text` is not a `str`.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: np.ndarray) -> str:
        """The text of `ids`; special tokens are dropped.

        **Arguments:**

        - `ids`: integer token ids in `[0, vocab_size)`, shape `[length]`.

        **Returns:** the decoded string.

        **Raises:** `ValueError` if `ids` is not a 1-D array of integers or an id lies outside
        `[0, vocab_size)`.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D array of integers, got shape {ids.shape} and dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def text_examples(documents: Sequence[str], tokenizer: Tokenizer, *, seed: int = 0, shuffle: bool = True,
                  num_epochs: int | None = 1) -> grain.MapDataset:
    """Documents as training examples: `<bos> text <eos>`, every token a target.

    Tokenized lazily (one document when it is read), in the `{"tokens", "loss_mask", "vision_mask"}` form that
    [`packed_batches`][data_pipelines.packed_batches] and
    [`global_packed_batches`][data_pipelines.global_packed_batches] pack; a document longer than a
    row is split over rows by their default `overflow="split"`.

    **Arguments:**

    - `documents`: the texts, one per document (e.g. the contents of text files).
    - `tokenizer`: a [`Tokenizer`][data_pipelines.Tokenizer], e.g. an
      [`HFTokenizer`][data_pipelines.HFTokenizer].
    - `seed`: the shuffle seed (default 0).
    - `shuffle`: shuffle the documents, anew each epoch (default `True`).
    - `num_epochs`: passes over the documents; `None` repeats forever (default 1).

    **Returns:** a `grain.MapDataset` of dicts: `"tokens"` int32 `[length]`, `"loss_mask"` bool
    `[length]`, all True, and `"vision_mask"` bool `[length]`, all False.

    **Raises:** `ValueError` if `documents` is empty or holds something other than strings.
    """
    documents = list(documents)
    if not documents or not all(isinstance(d, str) for d in documents):
        raise ValueError(f"documents must be a non-empty sequence of str, got {len(documents)} items of types "
                         f"{sorted({type(d).__name__ for d in documents})}")

    def example(text: str) -> dict[str, np.ndarray]:
        tokens = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text), [tokenizer.eos_id]]).astype(np.int32)
        return {"tokens": tokens, "loss_mask": np.ones(tokens.shape, bool), "vision_mask": np.zeros(tokens.shape, bool)}

    dataset = grain.MapDataset.source(documents)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(num_epochs).map(example)
