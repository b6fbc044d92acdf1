"""`xrayfm explain` (overlays for images) and `xrayfm explain-eval` (the faithfulness table)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from xrayfm.commands.output import print_json
from xrayfm.data import DATASET_KINDS

METHODS = ("rollout", "grad-rollout", "gradcam")


def cmd_explain(args: argparse.Namespace) -> int:
    """Predict and write an overlay, a raw map and predictions.json for each image."""
    import numpy as np

    from xrayfm.data.images import read_image
    from xrayfm.explain.overlay import heatmap_on_image, render_overlay, to_png_bytes
    from xrayfm.inference import Predictor, load_served_model
    from xrayfm.utils import to_jsonable

    served = load_served_model(args.checkpoint, device=args.device)
    predictor = Predictor(served)
    method = predictor.method(args.method)  # None: the model's default; refused early if unsupported
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers, used = [], set()
    for path in map(Path, args.images):
        image = read_image(path)
        batch = predictor.preprocess([image])
        logits, maps = predictor.forward(batch, True, method)
        probs = served.probabilities(logits)[0]
        answer = predictor.decide(probs)
        pre = served.preprocessing
        heat = heatmap_on_image(maps[0], image.shape, pre.size, pre.mode)
        overlay = render_overlay(image, heat.astype(np.float32) / 255.0, alpha=args.alpha)
        stem = path.stem if path.stem not in used else f"{path.stem}_{len(used)}"  # same names, other folders
        used.add(stem)
        (out / f"{stem}_overlay.png").write_bytes(to_png_bytes(overlay))
        (out / f"{stem}_map.png").write_bytes(to_png_bytes(heat))
        answers.append(
            {
                "image": str(path),
                **dataclasses.asdict(answer),
                "method": method,
                "overlay": str(out / f"{stem}_overlay.png"),
                "map": str(out / f"{stem}_map.png"),
            }
        )
    result = {"model": served.info(), "predictions": answers}
    (out / "predictions.json").write_text(json.dumps(to_jsonable(result), indent=2, allow_nan=False))
    if args.json:
        print_json(result)
    else:
        for a in answers:
            print(f"{a['image']}: {a['prediction']} (p={a['probability']:.3f}) -> {a['overlay']}")
        if served.info()["synthetic"]:
            print("note: this model was trained on SYNTHETIC phantoms, not medical data")
        print(f"predictions: {out / 'predictions.json'}")
    return 0


def cmd_explain_eval(args: argparse.Namespace) -> int:
    """Score explanation methods (the faithfulness table) and print or write it."""
    from xrayfm.commands.explain_eval import faithfulness_table, table_markdown
    from xrayfm.explain.methods import canonical_method
    from xrayfm.utils import to_jsonable

    methods = tuple(canonical_method(m) for m in args.method) if args.method else None  # None: the model's
    result = faithfulness_table(
        args.checkpoint, args.kind, args.root, split=args.split, methods=methods, limit=args.limit,
        steps=args.steps, seed=args.seed, progress=not args.json,
    )  # fmt: skip
    markdown = table_markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "faithfulness.json").write_text(json.dumps(to_jsonable(result), indent=2, allow_nan=False))
        (out / "faithfulness.md").write_text(markdown)
    if args.json:
        print_json(result)
    else:
        print(markdown)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `explain` and `explain-eval` to the `xrayfm` parser."""
    p = subparsers.add_parser(
        "explain", help="predict and draw where the model looked (heatmap overlays) for images",
        description="For each image (PNG, JPEG or DICOM): the checkpoint's prediction and an explanation map, "
        "written as IMAGE_overlay.png (map blended over the radiograph), IMAGE_map.png (the raw map, "
        "grey) and predictions.json.",
    )  # fmt: skip
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (.png, .jpg, .dcm)")
    p.add_argument("--checkpoint", required=True, help="model folder (full checkpoint or LoRA-adapted)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="rollout (attention rollout, ViT), grad-rollout (class-specific, Chefer et al., ViT), "
                   "gradcam (Grad-CAM on the last conv stage: ResNet, ConvNeXt, DenseNet); default: rollout "
                   "for a ViT, gradcam for a CNN; rollout on a CNN is refused")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0..1 (default 0.5)")
    p.add_argument("--out", required=True, help="folder for overlays and predictions.json")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--json", action="store_true", help="print predictions as one JSON object")
    p.set_defaults(func=cmd_explain)

    p = subparsers.add_parser(
        "explain-eval", help="score explanation methods: pointing game, IoU, deletion/insertion, randomisation",
        description="The faithfulness table of each method against a random-map baseline. With ground-truth "
        "masks (the synthetic phantoms' findings.csv): pointing game and top-20%% IoU too.",
    )  # fmt: skip
    p.add_argument("kind", choices=DATASET_KINDS, help="dataset layout (chexpert, mura, ...)")
    p.add_argument("root", help="dataset root")
    p.add_argument("--checkpoint", required=True, help="model folder (full checkpoint or LoRA-adapted)")
    p.add_argument("--split", default="valid", help="split to explain (default valid)")
    p.add_argument("--method", action="append", choices=METHODS,
                   help="method to score; repeatable (default: the model's: rollout and grad-rollout for a ViT, "
                   "gradcam for a CNN)")  # fmt: skip
    p.add_argument("--limit", type=int, default=64, help="at most this many images (default 64)")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling images and random maps")
    p.add_argument("--out", help="folder for faithfulness.json and faithfulness.md")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_explain_eval)
