"""``harmony``: adaptive compatible feature modulation + cumulative modal bridging.

After Harmony (arXiv 2504.13218, "Harmony: A Unified Framework for Modality Incremental
Learning"). Only the abstract-level description is public and there is no code; everything below
is **our interpretation** for a LLaVA-style model with a shared connector
(``model.connector.mode: shared``), applied to the connector's output (the "modal features" the
LLM reads). No raw data of an earlier modality is kept: only per-modality feature statistics.

Adaptive compatible feature modulation (ACFM)
    Every modality ``m`` gets a modulator after the shared projector, FiLM-style and low-rank::

        h~ = h * (1 + U_g D h) + U_b D h          (D: H -> rank, U_g, U_b: rank -> H, U zero-init)

    applied to ``m``'s projected tokens only (a pre-hook on ``connector.input_layers[m]`` tells it
    which modality is projected; a forward hook on ``connector.shared`` modulates). It trains in
    ``m``'s stages and is frozen otherwise. While a new modality trains, the ``compat`` term pulls
    the first two moments (per token position and dimension) of its modulated features toward the
    *aggregate* stored statistics of the earlier modalities' modulated features, so the shared
    LLM keeps receiving inputs of the distribution it was tuned on:
    ``compat = mean((mean_b h~ - mu_old)^2 + (std_b h~ - sigma_old)^2) / mean(sigma_old^2)``.

Cumulative modal bridging (CMB)
    *Aggregation*: after each stage, the statistics of its modality are merged (count-weighted)
    into that modality's running statistics and into the running aggregate over all modalities
    seen: the mean and std of the shared projector's *input* ``z`` (what ``input_layers[m]``
    writes; fixed once ``m``'s input layer is frozen) and of the modulated output ``h~``, and
    ``m``'s prototype ``normalize(mean h~)``. *Alignment*, three terms, on pseudo-features drawn
    from the stored input statistics of every earlier modality ``k`` (``z ~ N(mu_k, sigma_k)``,
    ``pseudo_samples`` per modality per step, seeded by run seed, stage and step), each
    modulated by ``k``'s frozen modulator:

    ``feature``  MSE between the current and the stage-start model's (``ctx.teacher()``) connector
                 output on the pseudo-features, relative to ``k``'s stored output variance (the
                 shared projector must keep mapping old modalities where it did);
    ``logit``    ``T^2 * KL(teacher_T || student_T)`` of the LLM's next-token distributions on the
                 batch's own prompts with each sample's placeholder tokens replaced by
                 pseudo-features of an earlier modality (``logit_context: batch``; ``none``, or
                 token counts that differ: the pseudo-feature tokens alone), from the first
                 placeholder on (protects what the LLM -- e.g. its LoRA -- does with an old
                 modality's tokens followed by a question);
    ``proto``    prototype contrast: each old modality's current pseudo-feature mean must stay
                 nearest its own stored prototype, against the other stored prototypes and the
                 new modality's batch mean (cross-entropy over cosines / ``tau``).

Loss terms (from the second modality stage on): ``compat``, ``feature``, ``logit``, ``proto``,
each times its weight (``0`` switches a term off). State: the statistics and prototypes per
modality, the aggregate, the draw counter; saved as tensors with every checkpoint (a mid-stage
``--resume`` restores them and the teacher).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mil_plugins.methods._common import salt
from mil_plugins.methods.base import Method
from mil_plugins.methods.harmony_modules import (NAME, TERMS, HarmonyStack,  # noqa: F401
                                                 Modulator, _moments, merge_stats)
from mil_plugins.methods.lwf import masked_kl


class Harmony(Method):
    name = NAME
    uses_teacher = True
    default_options = {
        "rank": 8,                 # modulators' rank
        "compat": 0.1,             # weight of the compatibility (moment) term
        "feature": 1.0,            # weight of the pseudo-feature alignment term
        "logit": 1.0,              # weight of the pseudo-feature logit distillation term
        "proto": 0.1,              # weight of the prototype contrast term
        "logit_context": "batch",  # batch: pseudo-features in the batch's prompts; none: alone
        "T": 2.0,                  # logit distillation temperature
        "tau": 0.1,                # prototype contrast temperature
        "pseudo_samples": 8,       # pseudo-features per earlier modality per step
        "stat_samples": 256,       # training samples of a stage for its statistics (null: all)
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        for key in ("rank", "pseudo_samples"):
            if int(o[key]) < 1:
                raise ValueError(f"method {NAME!r}: {key} must be >= 1, got {o[key]!r}")
        for key in (*TERMS,):
            if float(o[key]) < 0:
                raise ValueError(f"method {NAME!r}: {key} must be >= 0, got {o[key]!r}")
        for key in ("T", "tau"):
            if float(o[key]) <= 0:
                raise ValueError(f"method {NAME!r}: {key} must be > 0, got {o[key]!r}")
        if o["logit_context"] not in ("batch", "none"):
            raise ValueError(f"method {NAME!r}: logit_context must be 'batch' or 'none', "
                             f"got {o['logit_context']!r}")
        if o["stat_samples"] is not None and int(o["stat_samples"]) < 1:
            raise ValueError(f"method {NAME!r}: stat_samples must be >= 1 or null (all)")
        self.model = None
        self.stats: dict[str, dict] = {}       # modality -> running statistics
        self.aggregate: dict | None = None     # over every modality seen
        self.prototypes: dict[str, torch.Tensor] = {}
        self._step, self._micro = 0, 0

    # ---- structure -----------------------------------------------------------------------------
    def setup(self, ctx):
        model = ctx.model
        conn = model.connector
        if getattr(conn, "mode", None) != "shared":
            raise ValueError(f"method {NAME!r} needs a shared connector (model.connector.mode: "
                             f"shared): its modulation and statistics live on the shared output")
        self.model = model
        mods = []
        for st in ctx.stages:
            if st.modality and st.modality not in mods:
                mods.append(st.modality)
        if not hasattr(conn, "harmony"):
            stack = HarmonyStack(mods, conn.llm_hidden, int(self.options["rank"]))
            ref = next(conn.shared.parameters(), None)
            if ref is not None:
                stack.to(device=ref.device, dtype=ref.dtype)
            conn.harmony = stack
            stack.attach(conn)

    def _stack(self, model=None) -> HarmonyStack:
        return (model or self.model).connector.harmony

    @property
    def per_token(self) -> bool:
        """Statistics per token only when every modality's input layer writes the same fixed number
        of tokens (``mix_tokens``); otherwise (per-token modalities, or counts that differ, e.g.
        ``mix_tokens_by_modality: {image: null}``) pooled over tokens, so they compare across
        modalities."""
        conn = self.model.connector
        counts = {conn.mix_tokens_of(m) for m in conn.enc_hidden}
        return len(counts) == 1 and bool(next(iter(counts)))

    def trainable(self, ctx, stage, names):
        prefix = "connector.harmony.modulators."
        out = {n for n in names if not n.startswith(prefix)}
        m = stage.modality
        trains_connector = any(n.startswith("connector.") for n in names)
        if m and trains_connector and m in self._stack().modulators:
            out |= {n for n, _ in ctx.model.named_parameters() if n.startswith(f"{prefix}{m}.")}
        return out

    # ---- statistics ----------------------------------------------------------------------------
    def _shared_input(self, model, modality: str, feats: torch.Tensor) -> torch.Tensor:
        """What ``connector.shared`` reads for ``modality``'s encoder features."""
        conn = model.connector
        x = feats
        if modality in conn.standardizers:
            x = conn.standardizers[modality](x)
        layer = conn.input_layers[modality]
        p = next(layer.parameters())
        return layer(x.to(p.dtype))

    def _modulated(self, model, modality: str, z: torch.Tensor) -> torch.Tensor:
        """``connector.shared`` then ``modality``'s modulator, on shared inputs ``z`` (no hooks)."""
        conn = model.connector
        stack = self._stack(model)
        stack.current = None
        p = next(conn.shared.parameters())
        return stack.modulators[modality](conn.shared(z.to(p.dtype)))

    @torch.no_grad()
    def _stage_stats(self, ctx, stage) -> dict | None:
        m = stage.modality
        samples = [s for s in stage.train_samples if s.media.get(m)]
        n = self.options["stat_samples"]
        if n is not None:
            samples = samples[: int(n)]
        model = ctx.model
        was = model.training
        model.eval()
        zs, hs = [], []
        try:
            for batch in ctx.make_loader(samples, mode="eval", batch_size=32):
                x = (batch.get("media") or {}).get(m)
                if x is None or len(x) == 0:
                    continue
                feats = model.encode(m, x, (batch.get("media_kind") or {}).get(m, "input"))
                z = self._shared_input(model, m, feats)
                zs.append(z.float().cpu())
                hs.append(self._modulated(model, m, z).float().cpu())
        finally:
            model.train(was)
        if not zs:
            return None
        z, h = torch.cat(zs), torch.cat(hs)
        zm, zsd = _moments(z, self.per_token)
        hm, hsd = _moments(h, self.per_token)
        return {"n": int(z.shape[0]), "z_mean": zm, "z_std": zsd, "h_mean": hm, "h_std": hsd}

    # ---- hooks ---------------------------------------------------------------------------------
    def before_stage(self, ctx, stage):
        self._stack().last = {}

    def after_stage(self, ctx, stage):
        self._step, self._micro = 0, 0
        self._stack().last = {}
        if not stage.modality or ctx.make_loader is None:
            return
        new = self._stage_stats(ctx, stage)
        if new is None:
            return
        m = stage.modality
        # a returning modality: its statistics are replaced by the merge of old and new data
        self.stats[m] = merge_stats(self.stats.get(m), new)
        self.aggregate = merge_stats(self.aggregate, new)
        self.prototypes[m] = F.normalize(self.stats[m]["h_mean"].mean(0), dim=0)

    def _old(self, stage) -> list[str]:
        return [m for m in self.stats if m != stage.modality]

    def _pseudo(self, ctx, modality: str) -> torch.Tensor:
        st = self.stats[modality]
        g = ctx.generator(salt(NAME, modality, self._step, self._micro))
        n = int(self.options["pseudo_samples"])
        noise = torch.randn((n, *st["z_mean"].shape), generator=g)
        return st["z_mean"] + st["z_std"] * noise

    def loss_terms(self, ctx, batch, outputs):
        stage = ctx.stage
        stack = self._stack()
        last = stack.last
        stack.last = {}
        if stage is None or stage.index < 0 or not stage.modality:
            return {}
        old = self._old(stage)
        if not old:
            return {}
        o = self.options
        terms: dict[str, torch.Tensor] = {}
        new = last.get(stage.modality)
        model = ctx.model
        dev = next(model.connector.shared.parameters()).device
        if float(o["compat"]) > 0 and new is not None and new.shape[0] > 1:
            agg = {k: v.to(dev) for k, v in self.aggregate.items() if torch.is_tensor(v)}
            mean, std = _moments(new, self.per_token)
            scale = (agg["h_std"] ** 2).mean().clamp(min=1e-6)
            diff = ((mean - agg["h_mean"]) ** 2).mean() + ((std - agg["h_std"]) ** 2).mean()
            terms["compat"] = float(o["compat"]) * diff / scale
        needs_teacher = float(o["feature"]) > 0 or float(o["logit"]) > 0
        teacher = ctx.teacher() if needs_teacher else None
        cur, ref = {}, {}
        for k in old:
            z = self._pseudo(ctx, k).to(dev)
            cur[k] = self._modulated(model, k, z)
            if teacher is not None:
                with torch.no_grad():
                    ref[k] = self._modulated(teacher, k, z)
        self._micro += 1
        if float(o["feature"]) > 0:  # relative to each modality's stored output variance
            terms["feature"] = float(o["feature"]) * sum(
                F.mse_loss(cur[k].float(), ref[k].float())
                / (self.stats[k]["h_std"].to(dev) ** 2).mean().clamp(min=1e-6) for k in old) / len(old)
        if float(o["logit"]) > 0:
            context = self._in_context(model, stage, batch, old, cur, ref) \
                if o["logit_context"] == "batch" else None
            if context is not None:
                terms["logit"] = float(o["logit"]) * self._logit_kd(model, teacher, *context)
            else:
                terms["logit"] = float(o["logit"]) * sum(
                    self._logit_kd(model, teacher, cur[k], ref[k]) for k in old) / len(old)
        if float(o["proto"]) > 0:
            terms["proto"] = float(o["proto"]) * self._proto(old, cur, new)
        return terms

    def _in_context(self, model, stage, batch: dict, old: list[str], cur: dict, ref: dict):
        """The batch's prompts with each sample's placeholder tokens replaced by pseudo-features of
        an earlier modality (sample ``i``: ``old[i % len(old)]``): ``(student embeds, teacher
        embeds, attention mask, KD mask)``, or None when the token counts do not match."""
        ids = batch.get("input_ids")
        pid = getattr(model, "placeholder_ids", {}).get(stage.modality)
        if ids is None or pid is None:
            return None
        table = model.llm.get_input_embeddings()
        ids = ids.to(table.weight.device)
        pos = ids == pid
        k_tokens = cur[old[0]].shape[1]
        if not bool((pos.sum(1) == k_tokens).all()):
            return None
        n, p = len(old), int(self.options["pseudo_samples"])
        rows = range(ids.shape[0])
        fill_s = torch.stack([cur[old[i % n]][(i // n) % p] for i in rows])
        fill_t = torch.stack([ref[old[i % n]][(i // n) % p] for i in rows])
        with torch.no_grad():
            base = table(ids)
        where = pos.unsqueeze(-1)
        emb_s = base.masked_scatter(where, fill_s.to(base.dtype))
        emb_t = base.masked_scatter(where, fill_t.to(base.dtype))
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
        after = (pos.long().cumsum(1) > 0) & mask.bool()  # from the first placeholder token on
        return emb_s, emb_t, mask, after

    def _logit_kd(self, model, teacher, cur: torch.Tensor, ref: torch.Tensor,
                  mask: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """KL of the LLM's next-token distributions on input embeddings ``cur`` (student) and
        ``ref`` (teacher): the pseudo-features alone, or spliced into the batch's prompts."""
        if mask is None:
            mask = torch.ones(cur.shape[:2], dtype=torch.long, device=cur.device)
        keep = mask.bool() if keep is None else keep
        llm_dtype = model.llm.get_input_embeddings().weight.dtype
        pos = model.position_ids(mask) if hasattr(model, "position_ids") else None
        s = model.llm(inputs_embeds=cur.to(llm_dtype), attention_mask=mask, position_ids=pos,
                      use_cache=False, return_dict=True).logits
        with torch.no_grad():
            t = teacher.llm(inputs_embeds=ref.to(llm_dtype), attention_mask=mask, position_ids=pos,
                            use_cache=False, return_dict=True).logits
        return masked_kl(s, t, keep, float(self.options["T"]))

    def _proto(self, old: list[str], cur: dict, new: torch.Tensor | None) -> torch.Tensor:
        tau = float(self.options["tau"])
        protos = [self.prototypes[k] for k in old]
        losses = []
        q_new = F.normalize(new.float().reshape(-1, new.shape[-1]).mean(0), dim=0) if new is not None else None
        for i, k in enumerate(old):
            q = F.normalize(cur[k].float().reshape(-1, cur[k].shape[-1]).mean(0), dim=0)
            cands = [p.to(q.device) for p in protos] + ([q_new.detach()] if q_new is not None else [])
            if len(cands) < 2:
                continue
            logits = torch.stack([q @ c for c in cands]) / tau
            losses.append(F.cross_entropy(logits[None], torch.tensor([i], device=q.device)))
        if not losses:
            return next(iter(cur.values())).sum() * 0.0
        return sum(losses) / len(losses)

    def after_step(self, ctx, stage, step):
        self._step, self._micro = int(step), 0

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self):
        state: dict[str, Any] = {}
        if self.stats:
            state["stats"] = {m: dict(s) for m, s in self.stats.items()}
            state["aggregate"] = dict(self.aggregate or {})
            state["prototypes"] = dict(self.prototypes)
        if self._step:
            state["step"] = self._step
        return state

    def load_state_dict(self, state):
        state = state or {}
        self.stats = {str(m): {k: (v.detach().float().cpu() if torch.is_tensor(v) else int(v))
                               for k, v in s.items()} for m, s in (state.get("stats") or {}).items()}
        agg = state.get("aggregate")
        self.aggregate = ({k: (v.detach().float().cpu() if torch.is_tensor(v) else int(v))
                           for k, v in agg.items()} if agg else None)
        self.prototypes = {str(m): v.detach().float().cpu()
                           for m, v in (state.get("prototypes") or {}).items()}
        self._step, self._micro = int(state.get("step", 0)), 0
