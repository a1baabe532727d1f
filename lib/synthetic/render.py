"""Synthetic SEM, rendering: one image from (seed, class, index), and a whole dataset folder.

`render_dataset` renders in worker processes (the output does not depend on their number) into a
staging folder that replaces the target only once complete, and only when the target is missing,
empty or an earlier rendering holding only what the project wrote (`lib.io.replace_folder`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from lib.synthetic.geometry import CLASSES, _Canvas, _check_class, image_seed
from lib.synthetic.scene import _build_scene
from lib.synthetic.imaging import _draw_imaging, _form_image


def _py(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return str(v)


def render_image(seed: int, cls: str, index: int, *, size: int = 224) -> tuple[np.ndarray, dict]:
    """Render one image: a (size, size) uint8 grayscale array and a flat dict of drawn parameters.

    A pure function of its arguments (byte-identical in any process). Imaging parameters come from
    a stream that never depends on the class; only the defect geometry (and the layouts allowed
    for the class) differ. Unknown class -> ValueError naming the class.
    """
    _check_class(cls)
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    iseed = image_seed(seed, cls, index)
    r_img, r_lay, r_def, r_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(iseed).spawn(4))
    ip = _draw_imaging(r_img)
    cv = _Canvas(size, ip["pixel_nm"])
    geo: dict = {}
    sc = _build_scene(cv, cls, r_lay, r_def, geo)
    img = _form_image(sc, ip, r_noise)
    params = {"image_seed": iseed, "size": size}
    params.update(geo)
    params.update({k: v for k, v in ip.items() if not k.startswith("_")})
    return img, {k: _py(v) for k, v in params.items()}


def _slug(cls: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", cls.lower()).strip("_")


def _progress(enabled: bool, total: int):
    from tqdm import tqdm  # a console bar (tqdm.auto would warn in kernels without ipywidgets)

    return tqdm(total=total, desc="render", unit="img", disable=not enabled)


def _render_task(task):
    seed, cls, index, size, root = task
    from PIL import Image

    img, params = render_image(seed, cls, index, size=size)
    rel = f"{cls}/{_slug(cls)}_{index:04d}.png"
    Image.fromarray(img).save(os.path.join(root, rel), format="PNG", compress_level=1)
    return rel, cls, index, params


WHAT = "synthetic dataset"  # what lib.io's ownership marker calls a rendered folder


def render_dataset(out_dir, *, n_per_class: int | dict = 150, seed: int = 0, size: int = 224,
                   classes=CLASSES, workers: int = 2, progress: bool = False, finish=None):
    """Render out_dir/<class>/<slug>_<index:04d>.png plus out_dir/manifest.csv; return the manifest.

    n_per_class is a count per class or a dict class -> count (classes absent from the dict get
    none). Rendering runs in `workers` processes and the output does not depend on that number.
    `finish(folder, manifest)`, if given, runs on the complete folder before it is swapped in
    (planting copies, say); the dict it returns joins the folder's ownership record.

    Safe and atomic (`lib.io.replace_folder`): out_dir must be missing, empty, or an earlier
    rendering holding only what the project wrote; anything else raises lib.io.OwnershipError
    and is not touched. Images go to a staging folder that replaces out_dir only once complete;
    on failure the old out_dir is untouched and the staging folder is removed.
    """
    import pandas as pd

    from lib.io import replace_folder

    classes = tuple(classes)
    for c in classes:
        _check_class(c)
    if isinstance(n_per_class, dict):
        for c in n_per_class:
            _check_class(c)
            if c not in classes:
                raise ValueError(f"class {c!r} in n_per_class is not in classes")
        counts = {c: int(n_per_class.get(c, 0)) for c in classes}
    else:
        counts = {c: int(n_per_class) for c in classes}
    if any(v < 0 for v in counts.values()):
        raise ValueError("n_per_class must be non-negative")
    manifest = {}

    def fill(tmp: Path) -> dict:
        tasks = []
        for c in classes:
            if counts[c]:
                (tmp / c).mkdir()
            tasks += [(int(seed), c, i, int(size), str(tmp)) for i in range(counts[c])]
        results = []
        if workers <= 1 or len(tasks) <= 1:
            with _progress(progress, len(tasks)) as bar:
                for t in tasks:
                    results.append(_render_task(t))
                    bar.update()
        else:
            import multiprocessing as mp

            # fork (where available) needs no importable __main__; workers only run numpy/scipy
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
            with ctx.Pool(int(workers)) as pool, _progress(progress, len(tasks)) as bar:
                for res in pool.imap(_render_task, tasks, chunksize=4):
                    results.append(res)
                    bar.update()
        rows, keys = [], {}
        for rel, c, i, params in results:
            row = {"path": rel, "class": c, "index": i, "image_seed": params["image_seed"]}
            for k, v in params.items():
                if k not in row:
                    keys.setdefault(k, None)
                    row[k] = v
            rows.append(row)
        cols = ["path", "class", "index", "image_seed"] + list(keys)
        df = pd.DataFrame(rows, columns=cols)
        df.to_csv(tmp / "manifest.csv", index=False)
        manifest["df"] = df
        return finish(tmp, df) if finish is not None else {}

    replace_folder(Path(out_dir), fill, WHAT)
    return manifest["df"]
