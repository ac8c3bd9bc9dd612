"""A word-level tokenizer built from a few texts, for tests and the CPU quickstart (no download).

Words are split on whitespace and punctuation (punctuation marks are tokens of their own); the
special tokens (``<pad> <unk> <s> </s>`` plus e.g. the placeholders) are single tokens that the
pre-tokenizer never splits, wherever they appear (``"a</s>"`` is ``a`` + the EOS id). Decoding
joins the words with single spaces, so ``"a red circle"`` round-trips exactly.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Punctuation("isolated")])


def build_word_tokenizer(texts: Iterable[str], special_tokens: Sequence[str] = (),
                         padding_side: str = "right", min_count: int = 1):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts`` (seen at least
    ``min_count`` times; the others become ``<unk>``).

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, then ``special_tokens`` in order, then the
    words by decreasing frequency (ties alphabetical). Include the template's own words
    (``template.literal_text``) in ``texts``. ``save_pretrained`` / ``from_pretrained`` round-trip.
    """
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    specials: list[str] = []
    for tok in [PAD, UNK, BOS, EOS, *special_tokens]:
        if not tok or any(c.isspace() for c in tok):
            raise ValueError(f"special token {tok!r} must be non-empty without whitespace")
        if tok not in specials:
            specials.append(tok)
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        for chunk in _split_specials(text, specials):
            counts.update(word for word, _ in pre.pre_tokenize_str(chunk))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= min_count and word not in vocab:
            vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    extra = [t for t in specials if t not in (PAD, UNK, BOS, EOS)]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=extra, padding_side=padding_side, clean_up_tokenization_spaces=False)


def _split_specials(text: str, specials: list[str]) -> list[str]:
    chunks = [text]
    for tok in specials:
        chunks = [piece for chunk in chunks for piece in chunk.split(tok)]
    return chunks
