"""A LLaVA fork learns an audio stage with mil-plugins' modality plugins (docs/llava-forks.md).

    .venv/bin/python docs/llava_fork_audio_stage.py --out runs/llava-fork-audio            # ~1 min
    .venv/bin/python docs/llava_fork_audio_stage.py --out /tmp/x --steps 8 --eval 6        # what CI runs

Everything is LLaVA's own code (the ``llava`` package: LlavaLlamaForCausalLM, its CLIP tower,
process_images, tokenizer_image_token's conventions) except the marked mil-plugins calls. At tiny
scale the "pretrained" LLaVA-1.5 is built from config; in a real fork step 2 is
``load_pretrained_model("liuhaotian/llava-v1.5-7b", None, "llava-v1.5-7b")``.
Writes OUT/summary.json (losses, audio accuracy, how many image answers changed, reload check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image


def tiny_llava_15(out: Path, tokenizer):
    """Step 2 at tiny scale: a LLaVA-1.5-shaped model (Llama + CLIP tower + mlp2x_gelu projector)."""
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = out / "clip-tower"
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(str(tower))
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(str(tower))
    config = LlavaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         mm_vision_tower=str(tower.resolve()), mm_hidden_size=32,
                         mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                         mm_vision_select_feature="patch", mm_patch_merge_type="flat",
                         image_aspect_ratio="pad", tie_word_embeddings=False)
    model = LlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_model()
    return model


def batch_of(items, pad_id, left=False):
    """Pad rows of LLaVA-style ids (negative indices for media) into one batch."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (row, lab) in enumerate(items):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
        if lab is not None:
            labels[i, span] = torch.tensor(lab)
    return ids, mask, labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train", choices=["projector", "projector+llm"], default="projector+llm")
    parser.add_argument("--eval", type=int, default=24, help="test samples per modality")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from llava.mm_utils import process_images
    from llava.model import LlavaLlamaForCausalLM

    from mil_plugins.benchmark import make_benchmark                       # mil-plugins
    from mil_plugins.data import (build_word_tokenizer, encode_for_generation, encode_for_training,
                                  get_template, load_manifest)
    from mil_plugins.integrations.llava_fork import (add_modalities, adopt_llava_dir,
                                                     load_fork_modalities, placeholder_indices,
                                                     save_fork)
    from mil_plugins.plugins import MODALITIES
    from mil_plugins.scoring import exact_match

    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. data: mil-plugins' benchmark (LLaVA conversation JSON; "audio" key, "<audio>" placeholder)
    data = out / "data"
    make_benchmark(data, size="tiny", seed=0, modalities=["image", "audio"])
    template = get_template("vicuna_v1")                 # LLaVA's conv_templates["vicuna_v1"]
    manifests = {(m, s): json.loads((data / m / f"{s}.json").read_text())
                 for m in ("image", "audio") for s in ("train", "test")}
    texts = [template.literal_text] + [template.text(r["conversations"], ["<image>", "<audio>"])
                                       for rows in manifests.values() for r in rows]
    tokenizer = build_word_tokenizer(texts)               # a real fork: its LLaMA tokenizer

    # 2. the fork's pretrained LLaVA-1.5 (tiny, from config)
    model = tiny_llava_15(out, tokenizer).eval()
    image_processor = model.get_vision_tower().image_processor

    # 3. teach it audio: our audio plugin's encoder + an mlp2x_gelu projector, index -201
    add_modalities(model, {"audio": {}})                  # mil-plugins
    audio_plugin = model._mil_plugins["audio"]
    placeholders = {ph: (index, 1) for ph, index in placeholder_indices(model).items()}

    manifest_plugins = {"audio": audio_plugin, "image": MODALITIES.get("image")}

    def load(modality, split):
        samples = load_manifest(data / modality / f"{split}.json", root=data,
                                plugins=manifest_plugins).samples
        return samples[: args.eval] if split == "test" else samples

    def media(sample):
        if "audio" in sample.media:
            return {"audio": torch.stack([audio_plugin.preprocess(p) for p in sample.media["audio"]])}
        images = [Image.open(p).convert("RGB") for p in sample.media["image"]]
        return {"image": process_images(images, image_processor, model.config)}

    def answers(samples):
        model.config.tokenizer_padding_side = "left"
        preds = []
        for s in samples:                                 # one by one, as LLaVA's eval scripts do
            enc = encode_for_generation(s, tokenizer, template, placeholders, None)
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), images=media(s),
                                     max_new_tokens=4, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            preds.append(tokenizer.decode(gen[0], skip_special_tokens=True).strip())
        model.config.tokenizer_padding_side = "right"
        return preds

    image_test, audio_test = load("image", "test"), load("audio", "test")
    image_before = answers(image_test)

    # 4. the audio stage, on audio data only: the audio projector, and with --train projector+llm
    #    (LLaVA's finetuning recipe) the LLM too. The tiny LLM is random: its near-uniform output
    #    cannot be steered through the projector alone; a real LLaVA-1.5 can (LLaVA's stage 1).
    train = load("audio", "train")
    encoded = [(encode_for_training(s, tokenizer, template, placeholders, 512), s) for s in train]
    trainable = list(model.get_model().mil_projectors["audio"].parameters())
    if args.train == "projector+llm":
        trainable += list(model.get_model().layers.parameters()) + list(model.lm_head.parameters())
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(args.steps):
        pick = torch.randperm(len(encoded), generator=generator)[: args.batch_size].tolist()
        rows = [(encoded[i][0]["input_ids"], encoded[i][0]["labels"]) for i in pick]
        ids, mask, labels = batch_of(rows, tokenizer.pad_token_id)
        audio = torch.cat([media(encoded[i][1])["audio"] for i in pick])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, images={"audio": audio}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()

    audio_preds = answers(audio_test)
    audio_acc = sum(exact_match(p, s.conversations[-1]["value"])
                    for p, s in zip(audio_preds, audio_test)) / len(audio_test)
    image_after = answers(image_test)

    # 5. save as LLaVA does (+ the modalities/ sidecar), reload with LLaVA's class, adopt into ours
    checkpoint = save_fork(model, tokenizer, out / "checkpoint")          # mil-plugins
    reloaded = LlavaLlamaForCausalLM.from_pretrained(str(checkpoint)).eval()
    reloaded.get_vision_tower().load_model()
    load_fork_modalities(reloaded, checkpoint)                          # mil-plugins
    trained, model = model, reloaded
    reload_equal = answers(audio_test) == audio_preds
    ours = adopt_llava_dir(checkpoint)                                  # mil-plugins MultimodalLM
    del trained

    summary = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "steps": args.steps, "audio_accuracy": audio_acc, "audio_chance": 0.5,
               "trained": args.train,
               "image_answers_unchanged": image_before == image_after,
               "image_answers_changed": sum(a != b for a, b in zip(image_before, image_after)),
               "image_answers": len(image_before),
               "reload_gives_same_answers": reload_equal, "adopted_modalities": ours.modalities}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
