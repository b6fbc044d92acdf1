"""Train, test and ship the first-start model: LoRA on the shipped MAE foundation for paediatric pneumonia.

Every input may be redistributed (CC BY 4.0), so the result ships inside the package and the stack serves
it on its first start with no training and no data (``XRAYFM_BOOTSTRAP=shipped``):

1. train: Kermany 2018 **train** split (5,216 images, 2,635 patients), label ``Pneumonia`` (bacterial or
   viral) vs normal; a patient-level 10 % is the validation split that picks the epoch;
2. test: the official PneumoniaMNIST **test** split (624 images from Kermany's *test* split, which neither
   the foundation nor this adapter saw), 28 px upscaled to the model's 64 px: a harder, shifted test;
3. ship: ``xrayfm/models/weights/<name>/`` (adapter + head, meta with both reports), beside the foundation.

    python scripts/ship_pneumonia_adapter.py --out ../runs/pneumonia-lora [--data ../shared/data]

Everything but the shipped folder goes under --out (outside the repository: no data enters it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xrayfm.data.cache import prepare_cache
from xrayfm.data.folder import CsvDataset
from xrayfm.models.shipping import export_adapter, kermany_train_csv
from xrayfm.registry import PREFIX, WEIGHTS_DIR
from xrayfm.train import AdaptConfig, adapt
from xrayfm.train.evaluation import evaluate

FOUNDATION = "xrayfm/cxr-vit-tiny-mae"
LABEL = "Pneumonia"
INTENDED_USE = (
    "Research use only: not a medical device, not for diagnosis, triage or any clinical decision. "
    "Trained on 64 px paediatric chest X-rays from one hospital."
)


def pneumoniamnist_test_csv(data: Path, out: Path) -> Path:
    """The official PneumoniaMNIST test split written as PNGs (under --out) with path, Pneumonia."""
    arrays = np.load(data / "pneumoniamnist-full" / "pneumoniamnist.npz")
    images, labels = arrays["test_images"], arrays["test_labels"].reshape(-1)
    folder = out / "pneumoniamnist-test"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = folder / f"test_{k:04d}.png"
        if not path.exists():
            Image.fromarray(image).save(path)
        paths.append(str(path))
    csv = out / "pneumoniamnist-test.csv"
    pd.DataFrame({"path": paths, LABEL: labels.astype(int)}).to_csv(csv, index=False)
    return csv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="work folder (outside the repository)")
    parser.add_argument("--data", default="../shared/data", help="the real-data folder")
    parser.add_argument("--name", default="cxr-vit-tiny-mae-pneumonia-lora", help="the shipped name")
    parser.add_argument("--epochs", type=int, default=10, help="adaptation epochs")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ship", action="store_true", help="train and test only")
    args = parser.parse_args()
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    size = 64  # the foundation's input size (adapt checks it against the foundation's meta)

    train_cache, test_cache = out / "cache" / "kermany-train", out / "cache" / "pneumoniamnist-test"
    prepare_cache(
        CsvDataset(kermany_train_csv(data, out), label_columns=[LABEL], patient_column="patient_id"),
        train_cache,
        size=size,
    )
    prepare_cache(
        CsvDataset(pneumoniamnist_test_csv(data, out), label_columns=[LABEL]), test_cache, size=size
    )

    run = out / "run"
    if not (run / "summary.json").is_file():  # a finished run is reused (an interrupted one resumes)
        adapt(
            AdaptConfig(
                out=str(run), cache=str(train_cache), foundation=FOUNDATION, method="lora", epochs=args.epochs,
                lr=args.lr, batch_size=args.batch_size, val_fraction=0.1, seed=args.seed, n_bootstrap=1000,
                tensorboard=False, resume=(run / "last").exists(),
            )
        )  # fmt: skip
    test = evaluate(run / "best", out / "test", cache=str(test_cache), split="test", n_bootstrap=1000)
    test = {"split": "PneumoniaMNIST test (624)", "metric": test["metric"], "value": test["value"],
            "report": test["report"]}  # fmt: skip
    print(json.dumps({"test": {k: test[k] for k in ("metric", "value")}}, indent=1))
    if args.no_ship:
        return
    dst = WEIGHTS_DIR / args.name
    card = dst / "MODEL_CARD.md"
    export_adapter(
        run / "best",
        dst,
        FOUNDATION,
        card=card if card.is_file() else None,
        # not "name": a meta name would override the model store's name for the served version
        extra_meta={"shipped_name": PREFIX + args.name, "intended_use": INTENDED_USE, "test": test},
    )
    size_kb = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()) / 1024
    print(f"{PREFIX}{args.name}: {size_kb:.0f} KB in {dst}")


if __name__ == "__main__":
    main()
