"""Which findings can the pre-trained encoder see? A linear probe per finding, against pixels.

For every frontal image of the train split and of the held-out (val + test) studies, two feature
sets:
- ``encoder``: the frozen encoder's patch features (last block, before the final LayerNorm, where
  the C-Abstractor reads them) average-pooled to a 2x2 grid, so left and right stay apart;
- ``pixels``: the preprocessed image area-downsampled to 16x16, the floor any encoder should beat.
A logistic regression per finding (scikit-learn, standardised features) is fitted on train and
scored by AUROC on the held-out images (val and test together: the test split alone has 2-3
positives of some findings). A finding the encoder scores far below the pixels is one the later stages
cannot learn from its features.

A second table is the read-out's turn-1 ceiling: the same regressions scored by F1 on the test
split's frontal images (macro over the 13 CoT findings, as notebook 06's `cot_findings`), with
each finding's threshold tuned on the val split, and at 0.5 (what greedy decoding of a
calibrated model amounts to).

    python benchmarks/encoder_probe.py --out build/tiny [--backbones build/other/backbones]

Prints the table and writes ``<out>/metrics/encoder_probe.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrlib.backbones import label_vector, read_images, read_studies
from cxrlib.config import load_config
from cxrlib.constants import COT_FINDINGS
from cxrlib.model.build import build_encoder
from cxrlib.model.processor import ImageProcessor

FRONTAL = {"PA", "AP"}


def frontal_items(studies: list[dict], splits: set[str]) -> list[tuple[int, list[float]]]:
    return [
        (im["index"], label_vector(s["labels"]))
        for s in studies
        if s["split"] in splits
        for im in s["images"]
        if im["view"] in FRONTAL
    ]


@torch.no_grad()
def features(encoder, processor, images, indices: list[int], batch: int = 64) -> dict:
    """``encoder`` (2x2-pooled patch features) and ``pixels`` (16x16) for the given images."""
    enc, pix = [], []
    for k in range(0, len(indices), batch):
        x = processor([np.asarray(images[i]) for i in indices[k : k + batch]])
        hidden = encoder(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        grid = hidden.transpose(1, 2).reshape(len(x), -1, side, side)
        enc.append(F.adaptive_avg_pool2d(grid, 2).flatten(1))
        pix.append(F.adaptive_avg_pool2d(x[:, :1], 16).flatten(1))
    return {"encoder": torch.cat(enc).numpy(), "pixels": torch.cat(pix).numpy()}


def probe(train_x, train_y, test_x, test_y) -> dict[str, float | None]:
    """Test AUROC of one logistic regression per finding (None: a split lacks both classes)."""
    out = {}
    for j, name in enumerate(COT_FINDINGS):
        if not (0 < train_y[:, j].sum() < len(train_y)) or not (
            0 < test_y[:, j].sum() < len(test_y)
        ):
            out[name] = None
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        model.fit(train_x, train_y[:, j])
        out[name] = float(roc_auc_score(test_y[:, j], model.predict_proba(test_x)[:, 1]))
    return out


def f1_readout(train, val, test) -> dict[str, dict[str, float]]:
    """Test F1 per finding of a logistic regression fitted on ``train`` (``(x, y)`` pairs), with
    the threshold tuned on ``val`` (``tuned``) and at 0.5 (``at_0.5``); 0 where train has
    fewer than 2 positives."""
    out = {"tuned": {}, "at_0.5": {}, "threshold": {}}
    grid = np.linspace(0.02, 0.9, 45)
    for j, name in enumerate(COT_FINDINGS):
        if train[1][:, j].sum() < 2:
            out["tuned"][name] = out["at_0.5"][name] = out["threshold"][name] = 0.0
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        model.fit(train[0], train[1][:, j])
        pv, pt = (model.predict_proba(x)[:, 1] for x in (val[0], test[0]))
        best = max(grid, key=lambda t: f1_score(val[1][:, j], pv >= t, zero_division=0))
        out["tuned"][name] = float(f1_score(test[1][:, j], pt >= best, zero_division=0))
        out["at_0.5"][name] = float(f1_score(test[1][:, j], pt >= 0.5, zero_division=0))
        out["threshold"][name] = float(best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/tiny"), help="a make-all build")
    parser.add_argument("--backbones", type=Path, help="default: <out>/backbones")
    parser.add_argument("--json", type=Path, help="default: <out>/metrics/encoder_probe.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = args.backbones or args.out / "backbones"
    cfg = load_config(args.out / "data")  # the preset notebook 01 ran with
    encoder = build_encoder(cfg, backbones_dir=backbones).eval()
    processor = ImageProcessor(cfg)
    studies, images = read_studies(args.out), read_images(args.out)
    train, test = frontal_items(studies, {"train"}), frontal_items(studies, {"val", "test"})
    ftrain = features(encoder, processor, images, [i for i, _ in train])
    ftest = features(encoder, processor, images, [i for i, _ in test])
    ytrain = np.array([y for _, y in train])
    ytest = np.array([y for _, y in test])
    result = {
        kind: probe(ftrain[kind], ytrain, ftest[kind], ytest) for kind in ("encoder", "pixels")
    }
    print(f"{'finding':<28}{'held +':>7}{'encoder':>9}{'pixels':>8}")
    for j, name in enumerate(COT_FINDINGS):
        cells = [result[k][name] for k in ("encoder", "pixels")]
        shown = "".join(f"{c:>9.3f}" if c is not None else f"{'-':>9}" for c in cells)
        print(f"{name:<28}{int(ytest[:, j].sum()):>7}{shown}")
    means = {k: float(np.mean([v for v in r.values() if v is not None])) for k, r in result.items()}
    print(f"{'macro AUROC':<28}{'':>7}{means['encoder']:>9.3f}{means['pixels']:>8.3f}")
    # the turn-1 ceiling: fit on train, thresholds on val, F1 on test
    val, test_only = frontal_items(studies, {"val"}), frontal_items(studies, {"test"})
    fval = features(encoder, processor, images, [i for i, _ in val])
    ftest_only = features(encoder, processor, images, [i for i, _ in test_only])
    yval, ytest_only = np.array([y for _, y in val]), np.array([y for _, y in test_only])
    readout = {
        kind: f1_readout((ftrain[kind], ytrain), (fval[kind], yval), (ftest_only[kind], ytest_only))
        for kind in ("encoder", "pixels")
    }
    readout_macro = {
        kind: {t: float(np.mean(list(r[t].values()))) for t in ("tuned", "at_0.5")}
        for kind, r in readout.items()
    }
    print(f"\n{'test F1 (13 CoT findings, frontal)':<36}{'encoder':>9}{'(thr)':>7}{'pixels':>8}")
    for name in COT_FINDINGS:
        enc, pix = readout["encoder"], readout["pixels"]
        print(f"  {name:<34}{enc['tuned'][name]:>9.2f}{enc['threshold'][name]:>7.2f}"
              f"{pix['tuned'][name]:>8.2f}")  # fmt: skip
    for t in ("tuned", "at_0.5"):
        label = "macro, threshold tuned on val" if t == "tuned" else "macro, threshold 0.5"
        enc, pix = readout_macro["encoder"][t], readout_macro["pixels"][t]
        print(f"{label:<36}{enc:>9.3f}{'':>7}{pix:>8.3f}")
    target = args.json or args.out / "metrics" / "encoder_probe.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"backbones": str(backbones), "auroc": result, "macro_auroc": means,
               "test_f1": readout, "test_macro_f1": readout_macro}  # fmt: skip
    target.write_text(json.dumps(payload, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
