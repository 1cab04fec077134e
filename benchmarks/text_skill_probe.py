"""Does the pre-trained small LLM (notebook 02) have the skills phase 2 relies on? (issue 14)

Text-only conversations of VALIDATION studies (``cxrlib.data.text_instructions``: each image
written in words), the LM alone answers the first turn greedily, and the answer is compared
with the card's reference answer: exact match, and for box tasks whether it parses as boxes.
An LM that learnt only report prose scores near 0 here; one with the text instructions should
read the answer off the words. Used for docs/recipe-log.md:

    python benchmarks/text_skill_probe.py --out build/tiny [--per-task 30]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cxrlib.answers import parse_grounding
from cxrlib.backbones import read_studies
from cxrlib.config import load_preset
from cxrlib.data.conversations import build_conversation
from cxrlib.data.text_instructions import to_text_conversation
from cxrlib.data.tokenize import encode_prompt
from cxrlib.model import build_llm
from cxrlib.phases import stage_tokenizer

TASKS = ("organ_grounding", "finding_grounding", "single_disease", "multi_label", "vqa",
         "grounded_organ")  # fmt: skip
BOX_TASKS = {"organ_grounding", "finding_grounding"}


@torch.no_grad()
def answer(model, tokenizer, turns, max_new_tokens: int = 40) -> str:
    ids = encode_prompt(turns, tokenizer, 1, 0)
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
    prompt_len = len(encode_prompt(turns, tokenizer, 1, 0))
    return tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/tiny")
    parser.add_argument("--per-task", type=int, default=30)
    args = parser.parse_args()
    cfg = load_preset("tiny")
    out = Path(args.out)
    tokenizer = stage_tokenizer(cfg, out)
    model = build_llm(cfg, tokenizer, pretrained=True, backbones_dir=out / "backbones").eval()
    studies = [s for s in read_studies(out) if s["split"] == "val"]
    rng = np.random.default_rng(0)
    results = {}
    for task in TASKS:
        convs = [(c, s) for s in studies if (c := build_conversation(task, s, rng)) is not None]
        convs = convs[: args.per_task]
        exact = parsed = 0
        example = None
        for conv, study in convs:
            text = to_text_conversation(conv, study)
            got = answer(model, tokenizer, [{"user": text["turns"][0]["user"]}])
            ref = text["turns"][0]["assistant"]
            exact += got.rstrip(".") == ref.rstrip(".")
            parsed += parse_grounding(got) is not None
            example = example or {"reference": ref, "answer": got}
        results[task] = {
            "n": len(convs),
            "exact": exact / max(len(convs), 1),
            **({"parses_as_boxes": parsed / max(len(convs), 1)} if task in BOX_TASKS else {}),
            "example": example,
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
