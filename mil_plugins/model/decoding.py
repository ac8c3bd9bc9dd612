"""Answering with a :class:`~mil_plugins.model.mllm.MultimodalLM`: batched generation and
closed-set option scoring, continuing from the embedded, left-aligned prompts.

:class:`Decoding` is a mixin of :class:`~mil_plugins.model.mllm.MultimodalLM`; it holds no
parameters and uses the model's ``embed``, ``token_modality_map``, ``position_ids``, ``llm``,
``tokenizer`` and ``token_modality``."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch


class Decoding:
    """Generation and option scoring of :class:`~mil_plugins.model.mllm.MultimodalLM`."""

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], max_new_tokens: int = 16,
                 **gen_kwargs: Any) -> list[str]:
        """Answer every prompt of the batch; returns the decoded, stripped new text per sample.

        Batched, greedy by default (``do_sample=False``), with the KV cache. Prompts should be
        left-padded; right-padded rows are moved to the left here. ``gen_kwargs`` go to the
        LLM's ``generate`` (e.g. ``do_sample=True, temperature=0.7``).
        """
        seqs = self.generate_ids(batch, max_new_tokens=max_new_tokens, **gen_kwargs)
        texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def _prompt_inputs(self, batch: Mapping[str, Any]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings, attention mask and token-modality map of the batch's prompts, every row's
        padding moved to the left (what generation and option scoring continue from)."""
        embeds = self.embed(batch)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        tmap = self.token_modality_map(batch["input_ids"].to(embeds.device))
        return _left_align(embeds, mask.to(embeds.device), tmap)

    @torch.no_grad()
    def generate_ids(self, batch: Mapping[str, Any], max_new_tokens: int = 16,
                     **gen_kwargs: Any) -> torch.Tensor:
        """:meth:`generate` before decoding: the new token ids ``[B, <= max_new_tokens]``."""
        was_training = self.training
        self.eval()
        try:
            embeds, mask, tmap = self._prompt_inputs(batch)
            self.token_modality.prompt = tmap  # generated tokens are text (see layer_modules)
            tok = self.tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            gen_kwargs.setdefault("do_sample", False)
            gen_kwargs.setdefault("use_cache", True)
            gen_kwargs.setdefault("pad_token_id", pad_id)
            if tok.eos_token_id is not None:
                gen_kwargs.setdefault("eos_token_id", tok.eos_token_id)
            if not gen_kwargs["do_sample"]:
                # greedy: drop sampling defaults a model's generation_config may carry
                for k in ("temperature", "top_p", "top_k"):
                    gen_kwargs.setdefault(k, None)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                                    max_new_tokens=max_new_tokens, **gen_kwargs)
        finally:
            self.token_modality.prompt = self.token_modality.llm = None
            self.train(was_training)
        seqs = out.sequences if hasattr(out, "sequences") else out
        if seqs.shape[1] > max_new_tokens:  # some versions prepend the prompt ids
            seqs = seqs[:, -max_new_tokens:]
        return seqs

    @torch.no_grad()
    def option_log_likelihoods(self, batch: Mapping[str, Any],
                               options: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """``[i][j]``: the summed log-probability of token sequence ``options[i][j]`` right after
        prompt ``i`` of the batch (closed-set answering, lm-evaluation-harness's ``acc``).

        The prompts are embedded once (media encoded once); then one LLM call scores every
        (prompt, option) pair, prompt rows repeated, options right-padded after the prompts'
        common end. One call per batch keeps sharded (ZeRO-3) ranks in lock-step; its rows are
        the batch's total number of options, so ``eval.batch_size`` bounds its memory.
        """
        if len(options) != batch["input_ids"].shape[0]:
            raise ValueError(f"{len(options)} option lists for a batch of "
                             f"{batch['input_ids'].shape[0]} prompts")
        if any(not opts or any(len(o) == 0 for o in opts) for opts in options):
            raise ValueError("every prompt needs at least one option, and every option a token")
        was_training = self.training
        self.eval()
        try:
            embeds, mask, tmap = self._prompt_inputs(batch)
            device = embeds.device
            rows = torch.tensor([i for i, opts in enumerate(options) for _ in opts], device=device)
            flat = [list(o) for opts in options for o in opts]
            T = max(len(o) for o in flat)
            opt_ids = torch.zeros(len(flat), T, dtype=torch.long, device=device)
            opt_mask = torch.zeros(len(flat), T, dtype=mask.dtype, device=device)
            for k, o in enumerate(flat):
                opt_ids[k, :len(o)] = torch.as_tensor(o, dtype=torch.long)
                opt_mask[k, :len(o)] = 1
            opt_embeds = self.llm.get_input_embeddings()(opt_ids).to(embeds.dtype)
            inputs = torch.cat([embeds[rows], opt_embeds], dim=1)
            full_mask = torch.cat([mask[rows], opt_mask], dim=1)
            self.token_modality.prompt = tmap[rows]  # option tokens are text (see layer_modules)
            kwargs: dict[str, Any] = {}
            if "logits_to_keep" in inspect.signature(self.base_llm().forward).parameters:
                kwargs["logits_to_keep"] = T + 1  # the last prompt position and every option's
            out = self.llm(inputs_embeds=inputs, attention_mask=full_mask,
                           position_ids=self.position_ids(full_mask), use_cache=False,
                           return_dict=True, **kwargs)
        finally:
            self.token_modality.prompt = self.token_modality.llm = None
            self.train(was_training)
        logits = out.logits[:, -(T + 1):-1].float()  # position L-1+t predicts option token t
        logp = torch.log_softmax(logits, dim=-1).gather(-1, opt_ids.unsqueeze(-1)).squeeze(-1)
        totals = (logp * opt_mask.to(logp.dtype)).sum(dim=1).tolist()
        result, k = [], 0
        for opts in options:
            result.append(totals[k:k + len(opts)])
            k += len(opts)
        return result


def _left_align(embeds: torch.Tensor, mask: torch.Tensor, tmap: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move every row's padding to the left (no-op for left-padded batches)."""
    if mask.shape[1] == 0 or bool(mask[:, -1].all()):
        return embeds, mask, tmap
    L = mask.shape[1]
    # stable sort: padding (0) first, real tokens (1) after, each in original order
    order = torch.sort(mask.long(), dim=1, stable=True).indices
    embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    mask = torch.gather(mask, 1, order)
    tmap = torch.gather(tmap, 1, order)
    assert mask.shape[1] == L
    return embeds, mask, tmap
