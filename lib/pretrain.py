"""Synthetic pretraining: a body trained on the embedded SEM generator, as a weights source.

When no ImageNet weights exist for an architecture (MobileNetV2 offline), the embedded
physics-based generator can supply as many labelled SEM-like images as wanted. `ensure`
renders a set (seed and size from params), trains the architecture on it from scratch with
the training engine, and caches the result under `<build_dir>/pretrain/`; `weights:
synthetic` then loads its body. The cache is reused while the settings match.

    python -m lib.pretrain --params build/params/all.yaml [--arch mobilenet_v2 --width 1.0]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lib.model import synthetic_weights_path

# what a cached body depends on (besides arch and width)
KEYS = ("pretrain_per_class", "pretrain_epochs", "image_size", "seed", "lr", "batch_size", "weight_decay",
        "aug_shift", "aug_scale", "aug_brightness", "aug_contrast", "aug_noise", "aug_blur", "aug_resolution",
        "aug_gamma", "aug_jpeg", "aug_flip", "aug_rot90", "aug_shot", "synthetic_size")


def ensure(P: dict, *, arch: str | None = None, width: float | None = None, build_dir=None, log=print) -> Path:
    """The cached synthetic-pretrained body for (arch, width), trained now if missing or stale."""
    import torch

    from lib import data, engine, model as net, recipes, synthetic
    from lib.io import read_json, write_json_atomic
    from lib.params import path as resolve_path

    arch = arch or P["arch"]
    width = P["width"] if width is None else width
    build = resolve_path(build_dir or P["build_dir"])
    from lib.io import claim

    claim(build / "pretrain", "pretrained bodies")
    out = synthetic_weights_path(build, arch, width)
    settings = {"arch": arch, "width": width, **{k: P[k] for k in KEYS}}
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and read_json(meta).get("settings") == settings:
        return out
    root = build / "pretrain" / f"data_{P['pretrain_per_class']}_{P['synthetic_size']}_{P['seed']}"
    if not (root / "manifest.csv").is_file():
        log(f"rendering {P['pretrain_per_class']} synthetic images per class into {root}")
        synthetic.render_dataset(root, n_per_class=P["pretrain_per_class"], seed=P["seed"] + 1,
                                 size=P["synthetic_size"])
    manifest = pd.read_csv(root / "manifest.csv")
    classes = list(synthetic.CLASSES)
    gray = data.cache_gray([str(root / p) for p in manifest["path"]], P["image_size"])
    y = manifest["class"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    hold = np.random.default_rng(P["seed"]).random(len(y)) < 0.1
    TP = {**P, "arch": arch, "width": width, "weights": "none", "recipe": "ft", "epochs": P["pretrain_epochs"],
          "freeze_blocks": 0, "ema_decay": 0.0, "patience": P["pretrain_epochs"]}
    device = net.pick_device(P["device"])
    generator = engine.seed_everything(P["seed"], P["deterministic"])
    best = {}

    def keep(model, epoch, val):
        best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best["epoch"], best["val"] = epoch, (val or {}).get("macro_recall")

    log(f"pretraining {arch} (width {width}) on {len(y)} synthetic images for {P['pretrain_epochs']} epochs")
    trained = recipes.train_recipe(TP, {"train": gray[~hold], "val": gray[hold]}, {"train": y[~hold], "val": y[hold]},
                                 len(classes), device=device, generator=generator, on_best=keep, progress=False,
                                 build_dir=build)
    model = trained.model
    model.load_state_dict(best["state"])
    net.save_checkpoint(out, model, classes=classes, params=TP, epoch=best["epoch"],
                        weights={"source": "none", "detail": "random initialisation before synthetic pretraining"})
    write_json_atomic(meta, {"settings": settings, "best_epoch": best["epoch"], "val_macro_recall": best["val"],
                             "seconds": trained.fit.seconds, "torch": torch.__version__})
    log(f"wrote {out} (synthetic validation macro recall {best['val']:.3f} at epoch {best['epoch']}, "
        f"{trained.fit.seconds:.0f} s)")
    return out


def ready(P: dict, *, build_dir=None, log=print) -> None:
    """Make sure the weights the parameters name can be loaded: with `weights: synthetic`, the cached
    synthetic-pretrained body (trained now when missing or stale); any other source needs nothing."""
    if P["weights"] == "synthetic":
        ensure(P, build_dir=build_dir, log=log)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from lib import params

    ap = argparse.ArgumentParser(description="Train (or reuse) the synthetic-pretrained body.")
    ap.add_argument("--params", required=True, help="resolved parameter file (e.g. build/params/all.yaml)")
    ap.add_argument("--arch", help="architecture (default: the params' arch)")
    ap.add_argument("--width", type=float, help="MobileNetV2 width (default: the params' width)")
    args = ap.parse_args(argv)
    try:
        P = params.resolve(args.params)
        ensure(P, arch=args.arch, width=args.width)
    except (params.ParamError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
