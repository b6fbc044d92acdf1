"""Score explanation methods of a trained checkpoint: the faithfulness table behind `xrayfm explain-eval`.

On the synthetic phantoms (which ship a ground-truth mask per finding) every method gets the pointing
game, top-20% IoU, deletion/insertion AUCs against a random map, and the model-randomisation check. On
real data without masks (e.g. MURA) only deletion/insertion and the randomisation check are possible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrayfm.data import open_dataset
from xrayfm.data.images import fit_square, read_image
from xrayfm.errors import XrayfmError
from xrayfm.explain.api import explain
from xrayfm.explain.faithfulness import deletion_insertion, pointing_game, randomization_check, topk_iou
from xrayfm.explain.overlay import upsample_heatmap
from xrayfm.inference import Predictor, load_served_model

FINDINGS_FILE = "findings.csv"  # written by xrayfm.data.synth next to the label files


def load_cases(
    kind: str, root: str | Path, split: str, labels: list[str], limit: int, seed: int = 0
) -> pd.DataFrame:
    """Images to explain, one row each: path, target label index and (when the data has them) mask path.

    With masks (synthetic phantoms) a case is an image with one drawn finding whose label the model
    predicts; the finding named in findings.csv must be one of the model's labels, except for one-label
    (normal/abnormal) models, whose single label stands for any finding. Without masks: positive images.
    """
    dataset = open_dataset(kind, root, split=split)
    csv = dataset.csv
    findings_path = dataset.root / FINDINGS_FILE
    if findings_path.exists():
        findings = pd.read_csv(findings_path)
        merged = findings.merge(csv[["relpath", "path"]], left_on="Path", right_on="relpath")
        if len(labels) == 1:
            merged["target"] = 0
        else:
            merged = merged[merged["finding"].isin(labels)].copy()
            merged["target"] = merged["finding"].map(labels.index)
        merged["mask"] = merged["mask_path"].map(lambda p: str(dataset.root / p))
        cases = merged[["path", "target", "mask", "finding"]]
    else:
        columns = [dataset.pathologies.index(name) for name in labels if name in dataset.pathologies]
        if not columns:
            raise XrayfmError(f"the dataset has none of the model's labels {labels}")
        raw = dataset.raw_labels[:, columns]
        row, col = np.nonzero(raw == 1)
        cases = pd.DataFrame(
            {"path": csv["path"].to_numpy()[row], "target": col, "mask": None, "finding": None}
        )
    if cases.empty:
        raise XrayfmError(f"no positive images to explain in {kind} {split} at {root}")
    cases = cases.drop_duplicates("path")
    return cases.sample(n=min(limit, len(cases)), random_state=seed).reset_index(drop=True)


def faithfulness_table(
    checkpoint: str | Path,
    kind: str,
    root: str | Path,
    split: str = "valid",
    methods: tuple[str, ...] | None = None,
    limit: int = 64,
    steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """One row per method: pointing game / IoU vs the masks (when present), deletion/insertion AUC vs a
    random map, and the Spearman correlation of maps from the trained vs a re-initialised model.
    `methods` None: every method the model supports (ViT: rollout, grad_rollout; CNN: gradcam)."""
    served = load_served_model(checkpoint, device="cpu")
    predictor = Predictor(served)
    methods = predictor.methods if methods is None else tuple(predictor.method(m) for m in methods)
    cases = load_cases(kind, root, split, served.labels, limit, seed)
    images = [read_image(p) for p in cases["path"]]
    batch = predictor.preprocess(images)
    targets = cases["target"].astype(int).tolist()
    size, mode = served.preprocessing.size, served.preprocessing.mode
    has_masks = cases["mask"].notna().all()
    masks = None
    if has_masks:  # the masks go through the same fit-to-square as the pixels: model-input geometry
        masks = np.stack([fit_square(read_image(m), size, mode) > 127 for m in cases["mask"]])

    rows = []
    for method in methods:
        maps = explain(served.model, batch, method=method, target=None if method == "rollout" else targets)
        row: dict[str, Any] = {"method": method, "images": len(cases)}
        if masks is not None:
            full = np.stack([upsample_heatmap(m, (size, size)) for m in maps])
            row["pointing_hit_rate"] = pointing_game(full, masks)["hit_rate"]
            row["chance_hit_rate"] = float(masks.reshape(len(masks), -1).mean(axis=1).mean())
            row["iou_top20"] = topk_iou(full, masks, top_percent=20)["mean_iou"]
        curves = deletion_insertion(
            served.model, batch, maps, targets, steps=steps, seed=seed, progress=progress,
            output="softmax" if served.multiclass else "sigmoid",
        )  # fmt: skip
        row.update(
            deletion_auc=curves["deletion_auc_mean"],
            random_deletion_auc=curves["random_deletion_auc_mean"],
            insertion_auc=curves["insertion_auc_mean"],
            random_insertion_auc=curves["random_insertion_auc_mean"],
        )
        check = randomization_check(
            served.model, batch, method=method, target=None if method == "rollout" else targets, seed=seed,
            progress=progress,
        )  # fmt: skip
        row["randomized_spearman"] = check["mean_spearman"]
        rows.append(row)
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "model": served.info(),
        "dataset": {
            "kind": kind,
            "root": str(Path(root).resolve()),
            "split": split,
            "masks": bool(has_masks),
        },
        "rows": rows,
    }


def table_markdown(result: dict[str, Any]) -> str:
    """The faithfulness table as Markdown (what the README shows)."""
    with_masks = result["dataset"]["masks"]
    header = ["method", "images"]
    if with_masks:
        header += ["pointing hit rate", "chance", "IoU top-20%"]
    header += ["deletion AUC ↓", "random", "insertion AUC ↑", "random", "ρ vs randomised model"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        cells = [r["method"], str(r["images"])]
        if with_masks:
            cells += [f"{r['pointing_hit_rate']:.2f}", f"{r['chance_hit_rate']:.2f}", f"{r['iou_top20']:.2f}"]
        cells += [f"{r[k]:.3f}" for k in ("deletion_auc", "random_deletion_auc", "insertion_auc",
                                            "random_insertion_auc", "randomized_spearman")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["FINDINGS_FILE", "faithfulness_table", "load_cases", "table_markdown"]
