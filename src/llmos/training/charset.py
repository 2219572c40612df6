"""A character-level tokenizer for language models trained from scratch, saved as a real Hugging Face tokenizer.

Contract: :func:`build_char_tokenizer` collects every character of ``texts`` (code points, in sorted order, after
the four special tokens ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3) into a ``tokenizers`` WordLevel
model whose pre-tokenizer splits before every character and whose decoder concatenates the pieces unchanged. The
result is a ``transformers.PreTrainedTokenizerFast``: it adds ``<bos>`` in front when asked for special tokens (like
Llama tokenizers), never normalises or strips, and ``decode(encode(s), skip_special_tokens=True) == s`` for every
string whose characters are in the vocabulary, spaces, tabs and newlines included; other characters become
``<unk>``. It saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained``. The building is
deterministic: the same set of characters always gives the same ids. Literal special-token strings such as
``<eos>`` inside a text are read as the special token (the usual Hugging Face behaviour).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llmos.errors import InvalidInputError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
MAX_VOCAB = 1_000_000


def build_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character tokenizer whose vocabulary is the special tokens plus every character that occurs in ``texts``."""
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string", param="texts")
    chars: set[str] = set()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{index}] must be a string, got {type(text).__name__}", param="texts")
        chars.update(text)
    if not chars:
        raise InvalidInputError("texts contain no characters to build a vocabulary from", param="texts")
    if len(chars) > MAX_VOCAB:
        raise InvalidInputError(f"texts contain more than {MAX_VOCAB} distinct characters", param="texts")
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(chars)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
