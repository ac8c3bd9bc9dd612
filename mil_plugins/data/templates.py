"""Conversation templates, LLaVA's strings exactly.

A template renders a conversation (turns ``{"from": "human"|"gpt"|"system", "value": str}``) into
segments ``(text, is_target)``: the targets are the assistant answers including the separator that
ends them (``</s>`` for ``v1``, ``"\\n"`` for ``plain``); everything else is context. Joining the
segments' text gives exactly the string LLaVA's ``Conversation.get_prompt()`` builds.

The generation prompt is the same segments without the final answer, so training and generation see
the same tokens before the answer: for ``v1`` it ends with ``"ASSISTANT:"`` (LLaVA's prompt for
generation) and the answer segment starts with the space, ``" a</s>"``.

    plain   LLaVA pretraining: the human turn is replaced by its placeholders only;
            ``"<image>" + answer + "\\n"``. One human turn and one answer.
    v1      vicuna_v1 (alias ``vicuna_v1``): ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>``
    llava_v1  the same with LLaVA's "curious human" system prompt.
    qa      ``Q: q A: a</s>`` (no system prompt): a small template for tiny models.

A conversation's own first ``system`` turn replaces the template's system prompt (``plain`` has none).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

from mil_plugins.data.errors import DataError
from mil_plugins.data.manifest import ROLE_ALIASES, find_placeholders, placeholder_regex

Segment = tuple[str, bool]

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def conversation_rounds(conversations: Sequence[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """``(system or None, [(question, answer), ...])``; raises :class:`DataError` when turns are not
    an optional system turn followed by alternating human/gpt turns ending with an answer."""
    turns = []
    for i, turn in enumerate(conversations):
        role = turn.get("from") if isinstance(turn, dict) else None
        role = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise DataError(f"turn {i} is not a human/gpt turn with a string value")
        turns.append((role, value))
    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    if not turns or len(turns) % 2:
        raise DataError("a conversation must be human/gpt pairs ending with a gpt answer")
    rounds = []
    for k in range(0, len(turns), 2):
        (r1, q), (r2, a) = turns[k], turns[k + 1]
        if (r1, r2) != ("human", "gpt"):
            raise DataError(f"turns {k} and {k + 1} are {r1}/{r2}; expected human then gpt")
        rounds.append((q, a))
    return system, rounds


@dataclass(frozen=True)
class Template:
    """A conversation template. ``style`` is ``"plain"`` or ``"two"`` (LLaVA's SeparatorStyle.TWO:
    ``system sep role0: q sep role1: a sep2 ...``)."""

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    sep2: str = ""

    def __post_init__(self):
        if self.style not in ("plain", "two"):
            raise ValueError(f"template style must be 'plain' or 'two', got {self.style!r}")

    # -- rendering ---------------------------------------------------------------------------------
    def render(self, conversations: Sequence[dict], placeholders: Iterable[str] = ()
               ) -> list[Segment]:
        """The conversation as ``(text, is_target)`` segments (targets: the answers + separator).

        ``placeholders`` are the placeholder strings (``plain`` keeps only those of the human turn).
        """
        system, rounds = conversation_rounds(conversations)
        if self.style == "plain":
            if len(rounds) != 1:
                raise DataError(f"the 'plain' template takes one human turn and one answer; "
                                f"this conversation has {len(rounds)} rounds")
            question, answer = rounds[0]
            media = "".join(find_placeholders(question, placeholder_regex(placeholders)))
            segments = [(media, False), (answer + self.sep, True)]
        else:
            if system is None:
                system = self.system
            user, assistant = self.roles
            segments = []
            prefix = system + self.sep if system else ""
            for question, answer in rounds:
                segments.append((f"{prefix}{user}: {question}{self.sep}{assistant}:", False))
                segments.append((f" {answer}{self.sep2}", True))
                prefix = ""
        return [(text, target) for text, target in segments if text]

    def render_prompt(self, conversations: Sequence[dict], placeholders: Iterable[str] = ()
                      ) -> tuple[list[Segment], str]:
        """The generation prompt (every segment before the final answer: all turns up to the last
        human turn plus the assistant prefix) and the reference answer (the final gpt value)."""
        segments = self.render(conversations, placeholders)
        _, rounds = conversation_rounds(conversations)
        assert segments and segments[-1][1]
        return segments[:-1], rounds[-1][1]

    def text(self, conversations: Sequence[dict], placeholders: Iterable[str] = ()) -> str:
        """The whole conversation as one string (LLaVA's ``get_prompt()``)."""
        return "".join(t for t, _ in self.render(conversations, placeholders))

    def prompt_text(self, conversations: Sequence[dict], placeholders: Iterable[str] = ()) -> str:
        """The generation prompt as one string."""
        return "".join(t for t, _ in self.render_prompt(conversations, placeholders)[0])

    @property
    def literal_text(self) -> str:
        """Every string the template itself adds (to include when building a word vocabulary)."""
        return " ".join([self.system, *self.roles, ":", self.sep, self.sep2])


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", sep="\n"),
    "v1": Template("v1", "two", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ",
                   sep2="</s>"),
    "llava_v1": Template("llava_v1", "two", system=LLAVA_SYSTEM, roles=("USER", "ASSISTANT"),
                         sep=" ", sep2="</s>"),
    "qa": Template("qa", "two", system="", roles=("Q", "A"), sep=" ", sep2="</s>"),
}
TEMPLATES["vicuna_v1"] = dataclasses.replace(TEMPLATES["v1"], name="vicuna_v1")


def get_template(name: str | Template, **overrides) -> Template:
    """The template named ``name``; ``overrides`` replace fields (e.g. ``sep2="<|im_end|>"`` for an
    LLM whose end-of-sequence token is not ``</s>``)."""
    if isinstance(name, Template):
        template = name
    else:
        template = TEMPLATES.get(name)
        if template is None:
            close = difflib.get_close_matches(str(name), TEMPLATES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown conversation template {name!r}{hint} "
                             f"Known: {', '.join(sorted(TEMPLATES))}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(Template)} - {"name"}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown template field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        template = dataclasses.replace(template, **overrides)
    return template
