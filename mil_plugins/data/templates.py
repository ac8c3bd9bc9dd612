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

Every name of ``llava.conversation.conv_templates`` is here too (:data:`LLAVA_TEMPLATE_NAMES`), with
LLaVA's styles: ``single`` (v0: ``SYSTEM###Human: q###Assistant: a###``), ``two`` (v1), ``mpt``
(chatml: ``<|im_start|>user\\nq<|im_end|>``), ``llama_2`` (``[INST] <<SYS>>...<</SYS>>\\n\\nq [/INST] a </s>``)
and ``plain``; the ``*_mmtag`` ones wrap each placeholder in ``<Image>...</Image>`` as LLaVA's
``preprocess_multimodal`` does. ``default``/``v0`` render without the worked example that LLaVA's
``conv_vicuna_v0`` carries for chat demos (LLaVA's training does not use it either).

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
    """A conversation template. ``style`` is one of :data:`STYLES`, LLaVA's ``SeparatorStyle``s
    (``two``: ``system sep role0: q sep role1: a sep2 ...``). ``wrap`` is put around every
    placeholder of a human turn (``("<Image>", "</Image>")`` for LLaVA's mmtag templates)."""

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    sep2: str = ""
    wrap: tuple[str, str] = ("", "")

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"template style must be one of {STYLES}, got {self.style!r}")

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
            if any(self.wrap):
                pattern = placeholder_regex(placeholders)
                if pattern is not None:
                    rounds = [(pattern.sub(lambda m: self.wrap[0] + m.group() + self.wrap[1], q), a)
                              for q, a in rounds]
            segments = _RENDER[self.style](self, system, rounds)
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
        return " ".join([self.system, *self.roles, ":", self.sep, self.sep2, *self.wrap,
                         "[INST] [/INST] <<SYS>> <</SYS>>" if self.style == "llama_2" else ""])


def _alternate(rounds, prefix: str, ask, answer) -> list[Segment]:
    """``(prefix + ask(question), False), (answer(answer), True)`` per round; the prefix (the
    system text) goes before the first question only."""
    segments = []
    for question, reply in rounds:
        segments.append((prefix + ask(question), False))
        segments.append((answer(reply), True))
        prefix = ""
    return segments


def _render_two(t: Template, system: str, rounds) -> list[Segment]:
    user, assistant = t.roles
    return _alternate(rounds, system + t.sep if system else "",
                      lambda q: f"{user}: {q}{t.sep}{assistant}:", lambda a: f" {a}{t.sep2}")


def _render_single(t: Template, system: str, rounds) -> list[Segment]:
    user, assistant = t.roles
    return _alternate(rounds, system + t.sep,
                      lambda q: f"{user}: {q}{t.sep}{assistant}:", lambda a: f" {a}{t.sep}")


def _render_mpt(t: Template, system: str, rounds) -> list[Segment]:
    user, assistant = t.roles
    return _alternate(rounds, system + t.sep,
                      lambda q: f"{user}{q}{t.sep}{assistant}", lambda a: f"{a}{t.sep}")


def _render_llama_2(t: Template, system: str, rounds) -> list[Segment]:
    segments = []
    for i, (question, answer) in enumerate(rounds):
        if i == 0 and system:
            question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
        segments.append((f"{t.sep if i else ''}[INST] {question} [/INST]", False))
        segments.append((f" {answer} {t.sep2}", True))
    return segments


_RENDER = {"two": _render_two, "single": _render_single, "mpt": _render_mpt,
           "llama_2": _render_llama_2}
STYLES = ("plain", *_RENDER)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", sep="\n"),
    "v1": Template("v1", "two", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ",
                   sep2="</s>"),
    "llava_v1": Template("llava_v1", "two", system=LLAVA_SYSTEM, roles=("USER", "ASSISTANT"),
                         sep=" ", sep2="</s>"),
    "qa": Template("qa", "two", system="", roles=("Q", "A"), sep=" ", sep2="</s>"),
}
TEMPLATES["vicuna_v1"] = dataclasses.replace(TEMPLATES["v1"], name="vicuna_v1")

# LLaVA's other templates (llava.conversation.conv_templates), by the same names
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. If you don't know the answer to a "
    "question, please don't share false information.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                         "the visual content that the user provides, and assist the user with a "
                         "variety of tasks using natural language.")
_MMTAG_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant is able to understand the visual content that the user provides, and "
                 "assist the user with a variety of tasks using natural language.The visual content "
                 "will be provided with the following format: <Image>visual content</Image>.")
_v0 = Template("v0", "single", system=LLAVA_SYSTEM, roles=("Human", "Assistant"), sep="###")
_llama_2 = Template("llama_2", "llama_2", system=_LLAMA_2_SYSTEM, roles=("USER", "ASSISTANT"),
                    sep="<s>", sep2="</s>")
_chatml = Template("chatml_direct", "mpt", system="<|im_start|>system\nAnswer the questions.",
                   roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>")
for _t in (
    _v0, dataclasses.replace(_v0, name="default"), dataclasses.replace(_v0, name="llava_v0"),
    dataclasses.replace(_v0, name="v0_mmtag", system=_MMTAG_SYSTEM, wrap=("<Image>", "</Image>")),
    Template("v1_mmtag", "two", system=_MMTAG_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ",
             sep2="</s>", wrap=("<Image>", "</Image>")),
    _llama_2,
    dataclasses.replace(_llama_2, name="llava_llama_2", system=_LLAVA_LLAMA_2_SYSTEM),
    dataclasses.replace(_llama_2, name="mistral_instruct", system="", sep=""),
    _chatml, dataclasses.replace(_chatml, name="mistral_direct"),
    Template("mpt", "mpt", system="<|im_start|>system\nA conversation between a user and an "
             "LLM-based AI assistant. The assistant gives helpful and honest answers.",
             roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>"),
    dataclasses.replace(TEMPLATES["plain"], name="v0_plain"),
):
    TEMPLATES[_t.name] = _t
#: the names of ``llava.conversation.conv_templates``, every one of which is in TEMPLATES
LLAVA_TEMPLATE_NAMES = ("default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct",
                        "chatml_direct", "mistral_direct", "plain", "v0_plain", "llava_v0",
                        "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt")


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
