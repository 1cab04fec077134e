"""Does the LLM look at the image tokens? Attention share, input gradient and shuffled-image loss.

On 16 multi-label validation conversations (the CoT turn-1 question) of a run's data, for a
model built from a run's backbones (and optionally a trained ``phase1``/``phase2`` folder):

- the share of attention that answer positions give the image tokens, per layer (next to the
  share of positions that are image tokens);
- the mean gradient norm of the loss with respect to an image token's input embedding and a text
  token's (the ratio says how much less the image tokens can learn);
- the answer-token loss with the right images, with the images rolled by one, with blank images.

Used for docs/recipe-log.md ("Session 2"):

    python benchmarks/image_attention.py --out build/tiny [--checkpoint build/tiny/phase1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrlib import engine
from cxrlib.config import load_preset
from cxrlib.data.batches import ConversationCollate
from cxrlib.data.datasets import ConversationDataset, load_datasets
from cxrlib.data.features import encoder_features
from cxrlib.model.build import build_model
from cxrlib.model.io import load_trained_weights
from cxrlib.model.m4cxr import positions_from_mask
from cxrlib.phases import match_image_token_scale, stage_tokenizer


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    mask = labels[:, 1:] != -100
    return F.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/tiny", help="a run with data/ and backbones/")
    parser.add_argument("--checkpoint", default=None, help="phase1/ or phase2/ weights to load")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    out = Path(args.out)
    cfg = load_preset(args.preset)
    torch.manual_seed(0)
    tokenizer = stage_tokenizer(cfg, out)
    data = load_datasets(out / "data")
    model = build_model(cfg, tokenizer, backbones_dir=out / "backbones", lora=True)
    if args.checkpoint:
        load_trained_weights(model, Path(args.checkpoint))
    else:  # a fresh projector, brought to the word-embedding length as phase 1 does
        idx = [s["images"][0]["index"] for s in data.split("train")[:64]]
        match_image_token_scale(model, encoder_features(model, data.images, idx, cfg))
    val = ConversationDataset(data.studies, data.images, tokenizer, cfg, tasks=["multi_label"],
                              split="val", seed=1, length=16)  # fmt: skip
    batch = ConversationCollate(tokenizer.pad_token_id, cfg)([val[i] for i in range(16)])
    ids, mask, labels, pixels = (batch[k] for k in ("input_ids", "attention_mask", "labels",
                                                    "pixel_values"))  # fmt: skip
    with torch.no_grad():
        right = answer_loss(model(ids, mask, pixel_values=pixels).logits, labels)
        rolled = torch.roll(torch.arange(len(pixels)), 1)
        swapped = answer_loss(model(ids, mask, pixel_values=pixels[rolled]).logits, labels)
        blank = answer_loss(model(ids, mask, pixel_values=torch.zeros_like(pixels)).logits, labels)
    print(f"answer-token loss: right images {right:.4f}, rolled {swapped:.4f}, blank {blank:.4f}")

    image = ids == model.image_token_id
    answer = torch.zeros_like(image)
    answer[:, :-1] = labels[:, 1:] != -100  # positions that predict an answer token
    model.llm.set_attn_implementation("eager")  # sdpa does not return attention weights
    with torch.no_grad():
        out_attn = model.llm(inputs_embeds=model.embed_inputs(ids, pixels), attention_mask=mask,
                             position_ids=positions_from_mask(mask), output_attentions=True)  # fmt: skip
    share = image.float().sum(1).mean() / mask.float().sum(1).mean()
    for layer, weights in enumerate(out_attn.attentions, 1):
        on_image = (weights.mean(1) * image[:, None, :].float()).sum(-1)
        print(f"layer {layer}: attention of answer positions on image tokens "
              f"{on_image[answer].mean():.3f} (image tokens are {share:.3f} of the positions)")  # fmt: skip

    embeds = model.embed_inputs(ids, pixels).detach().requires_grad_(True)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask,
                       position_ids=positions_from_mask(mask)).logits  # fmt: skip
    loss, count = engine.causal_lm_loss(logits, labels)
    (loss / count).backward()
    norms = embeds.grad.norm(dim=-1)
    text = (~image) & (mask == 1)
    g_image, g_text = norms[image].mean().item(), norms[text].mean().item()
    print(f"input gradient norm: image token {g_image:.2e}, text token {g_text:.2e} "
          f"(text / image = {g_text / max(g_image, 1e-12):.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
