"""Shared helpers of the tests/test_model_*.py files: a word-level tokenizer, two fake
modalities, and batch builders following the data contract (placeholder expanded to num_tokens
copies; training batches right-padded, generation prompts left-padded)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin

WORDS = ["what", "is", "it", "?", "say", "answer", ":", "cat", "dog", "red", "blue", "green",
         "one", "two", "three", "four", "five", "six", "hello", "world", "a", "the"]


def make_tokenizer(extra_special: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", unk_token="<unk>")
    if extra_special:
        t.add_tokens([AddedToken(s, special=True, normalized=False) for s in extra_special],
                     special_tokens=True)
    return t


class VecEncoder(ModalityEncoder):
    """[B, dim] -> [B, tokens, hidden]."""

    def __init__(self, dim: int, tokens: int, hidden: int):
        super().__init__()
        self.hidden_size, self.num_tokens = hidden, tokens
        self.proj = nn.Linear(dim, tokens * hidden)

    def forward(self, x):
        return torch.tanh(self.proj(x)).view(x.shape[0], self.num_tokens, self.hidden_size)


class SeqEncoder(ModalityEncoder):
    """[B, tokens, dim] -> [B, tokens, hidden] with a tiny MLP, dropout included (eval matters)."""

    def __init__(self, dim: int, tokens: int, hidden: int):
        super().__init__()
        self.hidden_size, self.num_tokens = hidden, tokens
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Dropout(0.5), nn.GELU())

    def forward(self, x):
        return self.net(x)


class VecPlugin(ModalityPlugin):
    name = "mtest_vec"
    placeholder = "<vec>"
    default_projector = "mlp2x_gelu"
    default_options = {"dim": 6, "tokens": 2, "hidden": 12, "trainable": False}

    def preprocess(self, path):
        raise ModalityInputError(path, "fake modality", self.name)

    def build_encoder(self):
        o = self.options
        return VecEncoder(o["dim"], o["tokens"], o["hidden"])


class SeqPlugin(ModalityPlugin):
    name = "mtest_seq"
    placeholder = "<seq>"
    default_projector = "linear"
    default_options = {"dim": 5, "tokens": 3, "hidden": 10, "trainable": False}

    def preprocess(self, path):
        raise ModalityInputError(path, "fake modality", self.name)

    def build_encoder(self):
        o = self.options
        return SeqEncoder(o["dim"], o["tokens"], o["hidden"])


def media_shape(plugin: ModalityPlugin) -> tuple[int, ...]:
    o = plugin.options
    return (o["dim"],) if isinstance(plugin, VecPlugin) else (o["tokens"], o["dim"])


@contextlib.contextmanager
def one_thread():
    """Tiny models run ~10x faster on one intra-op thread than on two contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def registered_fakes():
    """Register the fake plugins in the modality registry for the duration of the block."""
    from mil_plugins.plugins import MODALITIES

    MODALITIES.register(VecPlugin.name, VecPlugin, replace=True)
    MODALITIES.register(SeqPlugin.name, SeqPlugin, replace=True)
    try:
        with one_thread():
            yield
    finally:
        MODALITIES.unregister(VecPlugin.name)
        MODALITIES.unregister(SeqPlugin.name)


def expand(model, text: str) -> list[int]:
    """Token ids of ``text`` with each placeholder expanded to num_tokens copies."""
    tok = model.tokenizer
    counts = {pid: n for pid, n in model.placeholders().values()}
    out: list[int] = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        out.extend([i] * counts.get(i, 1))
    return out


def make_batch(model, samples, train: bool = True):
    """samples: list of (prompt_text, answer_text | None, {modality: [tensor, ...]}).

    train=True: prompt + answer + eos, right-padded, labels on answer + eos only.
    train=False: prompt only, left-padded, no labels.
    """
    tok = model.tokenizer
    rows, labs = [], []
    media: dict[str, list[torch.Tensor]] = {}
    for prompt, answer, med in samples:
        p = expand(model, prompt)
        if train:
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(p + a)
            labs.append([-100] * len(p) + a)
        else:
            rows.append(p)
        for m, xs in med.items():
            media.setdefault(m, []).extend(xs)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        if train:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            labels[i, :len(r)] = torch.tensor(labs[i])
        else:
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
    batch = {"input_ids": ids, "attention_mask": mask,
             "media": {m: torch.stack(xs) for m, xs in media.items()},
             "media_kind": {m: "input" for m in media}}
    if train:
        batch["labels"] = labels
    return batch


def tiny_cfg(tokenizer, mode: str = "shared", lora=None, trainable_vec: bool = False,
             hidden: int = 32, **conn):
    from mil_plugins.model.build import build_tiny_llm_config

    return {
        "llm": {"config": build_tiny_llm_config(len(tokenizer), hidden_size=hidden,
                                                intermediate_size=2 * hidden)},
        "dtype": "float32",
        "modalities": {"mtest_vec": {"trainable": trainable_vec}, "mtest_seq": {}},
        "connector": {"mode": mode, **conn},
        "lora": lora,
    }


def greedy_recompute(model, batch, steps: int, suppress: list[int]) -> torch.Tensor:
    """Greedy decoding by full recomputation: the whole sequence through ``model.forward`` (which
    rebuilds the token-modality map from the ids) at every step; ``[B, steps]`` new ids, padded
    after EOS like HF ``generate``. ``suppress``: ids never chosen (placeholders)."""
    tok = model.tokenizer
    model.eval()  # as generate() runs
    ids, mask = batch["input_ids"], batch["attention_mask"]
    done = torch.zeros(len(ids), dtype=torch.bool)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model({**batch, "input_ids": ids, "attention_mask": mask}).logits[:, -1]
        logits[:, suppress] = float("-inf")
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        done |= nxt == tok.eos_token_id
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)
