"""Tokenisation with placeholder expansion and LLaVA's label masking.

The convention the model relies on: every placeholder string (``<image>``, ``<audio>``, ...) is ONE
special token of the tokenizer, and each occurrence of modality ``m``'s placeholder is encoded as
``num_tokens[m]`` consecutive copies of that token id (as transformers'
``LlavaForConditionalGeneration`` does with ``<image>``). The model then overwrites the embeddings of
each run, in order, with one item's encoder features (rows of ``batch["media"][m]``, sample-major).

``placeholders`` maps placeholder string -> ``(token_id, num_tokens)``; :func:`placeholder_tokens`
builds it from a tokenizer, the plugins and the per-modality token counts.

Labels are ``-100`` (:data:`IGNORE_INDEX`) everywhere except on the answers (including the ``</s>``
/ separator that ends them): the system prompt, the human turns, the role prefixes and the modality
tokens are never targets. The text between two placeholders is tokenised as one string with
``add_special_tokens=False`` (like LLaVA's ``tokenizer_image_token``, which tokenises the whole
conversation chunk by chunk around ``<image>``), so a SentencePiece-style tokenizer sees the same
text LLaVA gives it; a token is a target when its first character lies in an answer (character
offsets of a fast tokenizer; a slow tokenizer falls back to tokenising segment by segment). The BOS
token (if the tokenizer has one) is put once at the start.
"""

from __future__ import annotations

from typing import Any, Mapping

from mil_plugins.data.errors import DataError
from mil_plugins.data.manifest import placeholder_regex
from mil_plugins.data.templates import Template, get_template

IGNORE_INDEX = -100

_TEXT, _TARGET, _MEDIA = 0, 1, 2


def add_placeholder_tokens(tokenizer: Any, placeholder_strings) -> int:
    """Add the placeholder strings as special tokens (those not yet single tokens); returns how
    many were added (resize the LLM's embeddings by that much)."""
    from tokenizers import AddedToken

    new = [p for p in placeholder_strings if not _is_single_token(tokenizer, p)]
    if not new:
        return 0
    return tokenizer.add_tokens([AddedToken(p, special=True, normalized=False) for p in new],
                                special_tokens=True)


def _is_single_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def placeholder_tokens(tokenizer: Any, plugins: Mapping[str, Any],
                       num_tokens: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """``{placeholder: (token_id, num_tokens)}`` for every plugin; ``num_tokens`` is keyed by
    modality name. Raises ``ValueError`` when a placeholder is not a single token."""
    out: dict[str, tuple[int, int]] = {}
    for modality, plugin in plugins.items():
        ph = plugin.placeholder
        if not _is_single_token(tokenizer, ph):
            raise ValueError(f"placeholder {ph!r} of modality {modality!r} is not a single token of "
                             f"the tokenizer; add it first (add_placeholder_tokens)")
        if modality not in num_tokens:
            raise ValueError(f"no token count for modality {modality!r}")
        out[ph] = (tokenizer.convert_tokens_to_ids(ph), int(num_tokens[modality]))
    return out


def _check_placeholders(placeholders: Mapping[str, tuple[int, int]]) -> None:
    for ph, value in placeholders.items():
        try:
            tid, n = value
        except (TypeError, ValueError):
            raise ValueError(f"placeholders[{ph!r}] must be (token_id, num_tokens), got "
                             f"{value!r}") from None
        if not isinstance(tid, int) or not isinstance(n, int) or n < 1:
            raise ValueError(f"placeholders[{ph!r}] must be (int token_id, int num_tokens >= 1), "
                             f"got {value!r}")


def _sample_context(sample: Any) -> dict:
    return {"manifest": getattr(sample, "manifest", None), "sample_id": getattr(sample, "id", None),
            "index": getattr(sample, "index", None)}


def _conversations(sample: Any):
    if isinstance(sample, Mapping):
        return sample["conversations"]
    return sample.conversations


def _encode_units(segments, tokenizer, placeholders) -> list[tuple[list[int], int]]:
    """Segments -> units ``(ids, kind)``; a placeholder run is one unit of kind ``_MEDIA``; the text
    between placeholders is tokenised as one string (see the module docstring)."""
    pattern = placeholder_regex(placeholders)
    units: list[tuple[list[int], int]] = []
    run: list[tuple[str, bool]] = []   # the (text, is_target) pieces since the last placeholder

    for seg, target in segments:
        pos = 0
        for match in (pattern.finditer(seg) if pattern is not None else ()):
            if target:
                raise DataError(f"the placeholder {match.group()!r} is in an answer; placeholders "
                                f"belong in human turns")
            run.append((seg[pos:match.start()], target))
            units.extend(_encode_run(run, tokenizer))
            run = []
            tid, n = placeholders[match.group()]
            units.append(([tid] * n, _MEDIA))
            pos = match.end()
        run.append((seg[pos:], target))
    units.extend(_encode_run(run, tokenizer))
    return units


def _encode_run(pieces: list[tuple[str, bool]], tokenizer) -> list[tuple[list[int], int]]:
    """Placeholder-free text pieces -> units, tokenising their concatenation once."""
    pieces = [(text, target) for text, target in pieces if text]
    if not pieces:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [(list(ids), _TARGET if target else _TEXT) for text, target in pieces
                if (ids := tokenizer.encode(text, add_special_tokens=False))]
    text = "".join(t for t, _ in pieces)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    is_target = []  # per character
    for piece, target in pieces:
        is_target.extend([target] * len(piece))
    units: list[tuple[list[int], int]] = []
    for tid, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        kind = _TARGET if is_target[min(start, len(text) - 1)] else _TEXT
        if units and units[-1][1] == kind:
            units[-1][0].append(tid)
        else:
            units.append(([tid], kind))
    return units


def _bos(tokenizer) -> list[tuple[list[int], int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [([bos], _TEXT)] if bos is not None else []


def encode_for_training(sample: Any, tokenizer: Any, template: Template | str,
                        placeholders: Mapping[str, tuple[int, int]], max_length: int | None,
                        on_overflow: str = "error") -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one sample (see the module docstring for the convention).

    Longer than ``max_length``: the media runs (and the text before the last one) must fit, else a
    :class:`DataError`; then ``on_overflow="truncate"`` cuts the tail text (never a placeholder
    run), ``"error"`` raises. No answer token left -> :class:`DataError`.
    """
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
    _check_placeholders(placeholders)
    template = get_template(template)
    ctx = _sample_context(sample)
    try:
        segments = template.render(_conversations(sample), placeholders)
        units = _bos(tokenizer) + _encode_units(segments, tokenizer, placeholders)
    except DataError as exc:
        raise exc.with_context(**ctx) from None
    input_ids: list[int] = []
    labels: list[int] = []
    media_end = 0
    n_media = 0
    for ids, kind in units:
        input_ids.extend(ids)
        labels.extend(ids if kind == _TARGET else [IGNORE_INDEX] * len(ids))
        if kind == _MEDIA:
            media_end = len(input_ids)
            n_media += len(ids)
    if max_length is not None and len(input_ids) > max_length:
        if media_end > max_length:
            raise DataError(f"the media do not fit in max_length={max_length}: {n_media} modality "
                            f"tokens, and the sequence up to the end of the last one is "
                            f"{media_end} tokens (raise max_length or use fewer tokens per item)",
                            **ctx)
        if on_overflow == "error":
            raise DataError(f"{len(input_ids)} tokens exceed max_length={max_length} "
                            f"(on_overflow='truncate' cuts the tail text)", **ctx)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        why = (f" after truncation to max_length={max_length}"
               if max_length is not None and len(input_ids) == max_length else "")
        raise DataError(f"no answer token left{why}: nothing to train on", **ctx)
    return {"input_ids": input_ids, "labels": labels}


def encode_for_generation(sample: Any, tokenizer: Any, template: Template | str,
                          placeholders: Mapping[str, tuple[int, int]], max_length: int | None
                          ) -> dict[str, Any]:
    """``{"input_ids", "answer"}``: the prompt (every turn up to the last human turn plus the
    assistant prefix, tokenised exactly like the same context in training) and the reference
    answer. A prompt longer than ``max_length`` raises :class:`DataError`."""
    _check_placeholders(placeholders)
    template = get_template(template)
    ctx = _sample_context(sample)
    try:
        segments, answer = template.render_prompt(_conversations(sample), placeholders)
        units = _bos(tokenizer) + _encode_units(segments, tokenizer, placeholders)
    except DataError as exc:
        raise exc.with_context(**ctx) from None
    input_ids = [i for ids, _ in units for i in ids]
    if max_length is not None and len(input_ids) > max_length:
        raise DataError(f"the generation prompt is {len(input_ids)} tokens, more than "
                        f"max_length={max_length}", **ctx)
    return {"input_ids": input_ids, "answer": answer}


def encode_answer(sample: Any, answer: str, tokenizer: Any, template: Template | str,
                  placeholders: Mapping[str, tuple[int, int]]) -> list[int]:
    """The tokens that training puts right after :func:`encode_for_generation`'s prompt when the
    final answer is ``answer``: the answer and the separator that ends it (``" red</s>"`` in
    ``v1``). Closed-set evaluation scores these tokens' likelihood after the prompt.

    The prompt must tokenise the same with and without an answer after it (true of every shipped
    template with a word, SentencePiece or byte-level BPE tokenizer); else :class:`DataError`.
    """
    conversations = [dict(turn) for turn in _conversations(sample)]
    conversations[-1]["value"] = answer
    prompt = encode_for_generation(sample, tokenizer, template, placeholders, None)["input_ids"]
    full = encode_for_training({"conversations": conversations}, tokenizer, template,
                               placeholders, None)["input_ids"]
    if full[:len(prompt)] != prompt:
        raise DataError(f"the prompt tokenises differently when the answer {answer!r} follows it, "
                        f"so the answer's tokens cannot be scored after the prompt",
                        **_sample_context(sample))
    return full[len(prompt):]
