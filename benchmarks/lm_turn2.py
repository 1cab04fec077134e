"""Does the text-only LM's turn 2 follow turn 1? The measurement behind `lm_pretrain.report_corpus`.

``cxrlib.backbones.turn2_dependence`` on validation studies: the CoT single-image conversation in
words (the image as "(image)" by default, so turn 1 is the only source of the findings), turn 1 =
the study's true findings. Prints the nats that the true turn 1 saves on the report against
turn 1 = "Not found.", and on greedy reports how many are distinct and how many turn-1 findings
the labeler finds positive in them. Used for docs/recipe-log.md (Session 3):

    python benchmarks/lm_turn2.py --out build/tiny [--lm build/tiny/backbones/llm] [--words facts]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from cxrlib.backbones import turn2_dependence
from cxrlib.config import load_preset
from cxrlib.data.datasets import load_datasets
from cxrlib.phases import stage_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/tiny", help="a run with data/ and tokenizer/")
    parser.add_argument("--lm", default=None, help="default: <out>/backbones/llm")
    parser.add_argument("--words", default="none", choices=["none", "facts"])
    parser.add_argument("--studies", type=int, default=120, help="first N validation studies")
    args = parser.parse_args()
    out = Path(args.out)
    tokenizer = stage_tokenizer(load_preset("tiny"), out)
    lm = AutoModelForCausalLM.from_pretrained(args.lm or out / "backbones" / "llm")
    studies = load_datasets(out / "data").studies
    result = turn2_dependence(lm, tokenizer, studies, args.studies, args.words)
    print(json.dumps({"lm": str(args.lm or out / "backbones" / "llm"), "image_words": args.words,
                      **result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
