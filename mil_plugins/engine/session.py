"""What a recipe builds: plugins, data, tokenizer, model, methods and loaders (:class:`Session`).

A stage checkpoint rebuilt for ``mil eval`` / ``mil export`` is :mod:`mil_plugins.engine.loading`."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mil_plugins.engine.distributed import Dist
from mil_plugins.engine.trainable import group_names
from mil_plugins.methods.context import MethodContext, Stage
from mil_plugins.methods.dispatch import MethodHooks


def _in_dataloader_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Session:
    """Everything a recipe builds: plugins, data, tokenizer, model, methods, loaders."""

    def __init__(self, recipe: dict, dist: Dist, tokenizer_dir: Path | None = None,
                 load_data: bool = True):
        from mil_plugins.data import get_template
        from mil_plugins.plugins import METHODS, MODALITIES

        self.recipe, self.dist = recipe, dist
        self.out = Path(recipe["output"]["dir"])
        self.root = Path(recipe["data"]["root"])
        self.seed = recipe["train"]["seed"]
        self.template = get_template(recipe["model"]["template"])
        self.plugins = {name: MODALITIES.get(name)(**(opts or {}))
                        for name, opts in recipe["modalities"].items()}
        self.skipped: list[dict] = []
        self.stages = [Stage(i, s["name"], s["modality"], config=s)
                       for i, s in enumerate(recipe["stages"])]
        self.warmup_samples: list = []
        if load_data:
            self._load_data()
        self.tokenizer = self._tokenizer(tokenizer_dir)
        seed_everything(self.seed)
        self.model = self._build_model()
        if recipe["train"].get("gradient_checkpointing"):  # .get: checkpoints from before the key
            from mil_plugins.engine.activation_checkpointing import enable_gradient_checkpointing
            enable_gradient_checkpointing(self.model)
        self.model.to(dist.device)
        # the model's plugin objects preprocess the data (an adopted tower brings its own image one)
        self.plugins = dict(self.model.plugins)
        self.base_names = {n for n, _ in self.model.named_parameters()}
        self.base_buffers = {n for n, _ in self.model.named_buffers()}
        self.methods = [METHODS.get(m["name"])(**m["options"]) for m in recipe["methods"]]
        self.ctx = MethodContext(model=self.model, recipe=recipe, stages=self.stages, dist=dist,
                                 output_dir=self.out, seed=self.seed, make_loader=self.make_loader,
                                 resolve_groups=functools.partial(group_names, self.model))
        self.hooks = MethodHooks(self.methods, self.ctx)
        self.ctx.precision = recipe["train"].get("precision", "fp32")
        self.ctx.before_forward = self.hooks.before_forward
        self.ctx.load_samples = self.load_samples
        seed_everything(self.seed + 1)
        self.hooks.setup()
        self.model.to(dist.device)
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self._cache = None
        if recipe["train"]["feature_cache"]:
            from mil_plugins.cache import FeatureCache
            self._cache = FeatureCache(self.out / "feature-cache")
        self._fingerprints: dict[str, str] = {}

    def _build_model(self):
        """From config / a pretrained LM (``build_model``), or adopted from a Llava checkpoint."""
        from mil_plugins.model.build import build_model, resolve_dtype

        m = self.recipe["model"]
        conn = dict(m["connector"])
        if m["llm"]["llava"]:
            from mil_plugins.integrations.hf_llava import build_from_llava

            if conn["mode"] != "per_modality":
                raise ValueError("model.llm.llava: an adopted Llava keeps its own image projector; "
                                 "set model.connector.mode: per_modality")
            return build_from_llava(m["llm"]["llava"], self.tokenizer, self.recipe["modalities"],
                                    projector_type=conn["projector_type"],
                                    projector_types=conn["projector_types"], lora=m["lora"],
                                    dtype=resolve_dtype(m["dtype"]))
        if conn.get("shared_dim") is None:
            conn.pop("shared_dim", None)
        llm = {k: v for k, v in m["llm"].items() if v is not None and k != "llava"}
        return build_model({"llm": llm, "dtype": m["dtype"], "modalities": self.recipe["modalities"],
                            "connector": conn, "lora": m["lora"]}, self.tokenizer)

    # ---- data ---------------------------------------------------------------------------------

    def load_samples(self, manifest: str | Path, root: Path | None = None,
                     limit: int | None = None) -> list:
        from mil_plugins.data import load_manifest

        root = root or self.root
        path = Path(manifest)
        if not path.is_absolute():
            path = root / path
        data = load_manifest(path, root, self.plugins, on_error=self.recipe["data"]["on_error"])
        for s in data.skipped:
            self.skipped.append({"manifest": str(path), "id": s.id, "file": str(s.file or ""),
                                 "reason": s.reason})
        samples = list(data.samples)
        return samples[:limit] if limit else samples

    def _load_data(self) -> None:
        data = self.recipe["data"]
        self.warmup_samples = []
        if self.recipe["warmup"]:
            self.warmup_samples = self.load_samples(self.recipe["warmup"]["train"],
                                                    limit=data["max_train_samples"])
        for stage in self.stages:
            stage.train_samples = self.load_samples(stage.config["train"],
                                                    limit=data["max_train_samples"])
            if stage.config["test"]:
                stage.test_samples = self.load_samples(stage.config["test"],
                                                       limit=data["max_test_samples"])

    def _tokenizer(self, tokenizer_dir: Path | None):
        from transformers import AutoTokenizer

        placeholders = [p.placeholder for p in self.plugins.values()]
        if tokenizer_dir is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok_cfg = self.recipe["model"]["tokenizer"]
        if tok_cfg["build_from_data"]:
            from mil_plugins.data import build_word_tokenizer

            texts = [self.template.literal_text]
            for samples in [self.warmup_samples] + [s.train_samples + s.test_samples
                                                    for s in self.stages]:
                texts.extend(self.template.text(s.conversations, placeholders) for s in samples)
            return build_word_tokenizer(texts, special_tokens=placeholders)
        llm = self.recipe["model"]["llm"]
        source = tok_cfg["pretrained"] or llm["pretrained"] or llm["llava"]
        return AutoTokenizer.from_pretrained(source)

    def _media_loader(self, modality: str, path: Path):
        plugin = self.plugins[modality]
        if self.model.is_trainable_encoder(modality) or not self.recipe["train"]["feature_cache"]:
            return "input", plugin.preprocess(path)
        if self.dist.device.type != "cpu" and _in_dataloader_worker():
            return "input", plugin.preprocess(path)  # a forked DataLoader worker cannot use the GPU
        key = (modality, str(path))
        if key not in self._features:
            from mil_plugins.cache import cached_encode, encoder_fingerprint

            encoder = self.model.encoders[modality]
            if modality not in self._fingerprints:
                self._fingerprints[modality] = encoder_fingerprint(encoder)
            self._features[key] = cached_encode(self._cache, plugin, encoder, path,
                                                self._fingerprints[modality]).cpu()
        return "features", self._features[key]

    def dataset(self, samples: list, mode: str):
        from mil_plugins.data import MultimodalDataset

        return MultimodalDataset(samples, self.tokenizer, self.template, self.plugins,
                                 self.model.placeholders(), self.recipe["model"]["max_length"],
                                 mode=mode, media_loader=self._media_loader)

    def answer_options(self, samples: list) -> list | None:
        """Per sample, its closed-set candidates ``(text, token ids)`` when ``eval.choices`` asks
        for them (None for a generated sample); None when every answer is generated."""
        mode = self.recipe["eval"].get("choices")
        if mode is None:
            return None
        from mil_plugins.choices import sample_options
        from mil_plugins.data.tokenize import encode_answer

        placeholders = self.model.placeholders()
        return sample_options(samples, lambda sample, text: encode_answer(
            sample, text, self.tokenizer, self.template, placeholders), mode)

    def collator(self, mode: str):
        from mil_plugins.data import Collator

        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return Collator(pad, self.plugins, padding_side="right" if mode == "train" else "left")

    def make_loader(self, samples: list, mode: str = "eval", batch_size: int = 16):
        """Batches of ``samples`` in order (evaluation, teacher passes, pseudo-target generation)."""
        dataset, collate = self.dataset(samples, mode), self.collator(mode)
        from mil_plugins.engine.loop import to_device

        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            yield to_device(collate(items), self.dist.device)

    # ---- state --------------------------------------------------------------------------------
    def trained_weights(self, ever_trained: set[str]) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: every parameter trained so far, and every parameter or
        persistent buffer that methods added to the model."""
        out = {}
        for name, param in self.model.named_parameters():
            if name in ever_trained or name not in self.base_names:
                out[name] = param
        for name, buf in self._method_buffers().items():
            out[name] = buf
        for name, buf in self.model.named_buffers():  # fitted from data, not trained
            if ".standardizers." in name:
                out[name] = buf
        return out

    def _method_buffers(self) -> dict[str, torch.Tensor]:
        """Persistent buffers that methods added (``state_dict`` keys the base model lacks)."""
        state = self.model.state_dict(keep_vars=True)
        return {n: b for n, b in self.model.named_buffers()
                if n not in self.base_buffers and n in state}

    @torch.no_grad()
    def fit_standardizer(self, stage: Stage) -> None:
        """Fit the connector's standardiser of ``stage``'s modality to its training features, the
        first time that modality is trained (see :class:`~mil_plugins.model.connector.Standardizer`)."""
        m, conn = stage.modality, self.model.connector
        if not m or m not in conn or not conn.needs_fit(m):
            return
        feats = []
        for sample in stage.train_samples:
            for path in sample.media.get(m, []):
                kind, x = self._media_loader(m, path)
                feats.append(self.model.encode(m, x[None].to(self.dist.device), kind).float())
        if feats:
            conn.fit_standardizer(m, torch.cat(feats, 0))

    def method_states(self) -> dict[str, Any]:
        return self.hooks.state_dict()

    def restore(self, loaded: dict) -> None:
        """Methods first (they may re-create modules they added), then the weights on top."""
        self.hooks.load_state_dict(loaded["methods"])
        self.model.to(self.dist.device)
        params = {**dict(self.model.named_parameters()), **self._method_buffers()}
        params.update((k, b) for k, b in self.model.named_buffers() if ".standardizers." in k)
        missing = [k for k in loaded["weights"] if k not in params]
        if missing:
            raise KeyError(f"checkpoint weights not in the rebuilt model: {missing[:5]} "
                           f"(was the recipe or a method changed?)")
        with torch.no_grad():
            for key, value in loaded["weights"].items():
                params[key].copy_(value.to(params[key].dtype))
