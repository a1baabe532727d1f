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

from lib.synthetic.geometry import _F32, CLASSES, _Canvas, _check_class, image_seed
from lib.synthetic.scene import _build_scene
from lib.synthetic.imaging import _draw_imaging, _form_image, _record, _signal, visibility


def _py(v):
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return str(v)


MIN_VISIBILITY = 1.5  # the defect's CNR (imaging.visibility) above which every class is plain to see
SUBTLE_SHARE = 0.1  # defect images held only to two thirds of it: faint, but there
SUBTLE_FLOOR = 2 / 3
_VISIBILITY_TRIES = 12


def render_image(seed: int, cls: str, index: int, *, size: int = 224, min_visibility: float = MIN_VISIBILITY,
                 subtle_share: float = SUBTLE_SHARE) -> tuple[np.ndarray, dict]:
    """Render one image: a (size, size) uint8 grayscale array and a flat dict of drawn parameters.

    A pure function of its arguments (byte-identical in any process). Imaging parameters come from
    a stream that never depends on the class; only the defect geometry (and the layouts allowed
    for the class) differ. Unknown class -> ValueError naming the class.

    A review image exists because an inspection tool found a defect there, so a defect image shows
    its defect: its visibility (`imaging.visibility`, the contrast-to-noise ratio of the defect's own
    mask) must reach `min_visibility`, or two thirds of it for a `subtle_share` of images; the defect is
    redrawn (new geometry and contrast, same layout and imaging) until it does. When none of
    `_VISIBILITY_TRIES` draws does, the most visible one's own signal (its difference from the same
    image without the defect) is scaled up until it reaches the floor: a deeper groove, a denser
    residue; the rest of the image is untouched. The noise is never changed for this: it would tell
    classes apart.
    """
    _check_class(cls)
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    iseed = image_seed(seed, cls, index)
    seeds = np.random.SeedSequence(iseed).spawn(5)
    r_img, r_lay, r_def, r_noise, r_vis = (np.random.default_rng(s) for s in seeds)
    ip = _draw_imaging(r_img)
    cv = _Canvas(size, ip["pixel_nm"])
    params = {"image_seed": iseed, "size": size}
    if cls == "clean":
        geo: dict = {}
        img = _form_image(_build_scene(cv, cls, r_lay, r_def, geo), ip, r_noise)
        vis: dict = {"visibility": None, "defect_area_px": 0, "subtle": False,
                     "visibility_draws": 0, "contrast_gain": None}
    else:
        subtle = bool(r_vis.random() < subtle_share)
        floor = min_visibility * (SUBTLE_FLOOR if subtle else 1.0)
        reference = _signal(_build_scene(cv, cls, np.random.default_rng(seeds[1]), None, {}), ip,
                            np.random.default_rng(seeds[3]))
        best = None
        for draw in range(_VISIBILITY_TRIES):
            r_def = np.random.default_rng(seeds[2] if draw == 0 else [iseed, 2, draw])
            geo = {}
            sc = _build_scene(cv, cls, np.random.default_rng(seeds[1]), r_def, geo)
            rn = np.random.default_rng(seeds[3])
            Y = _signal(sc, ip, rn)
            stain = set(geo.get("defect", "").split("+")) == {"others/residue"}
            v = visibility(Y, reference, ip, stain)
            if best is None or v["visibility"] > best[0]["visibility"]:
                best = (v, geo, Y, rn, stain)
            if v["visibility"] >= floor:
                break
        v, geo, Y, rn, stain = best
        gain = 1.0
        if 0 < v["visibility"] < floor:  # no draw reached the floor: the defect's own contrast is raised to it
            gain = floor / v["visibility"] * (1 + 1e-4)  # the margin survives float32 rounding
            Y = reference + _F32(gain) * (Y - reference)
            v = visibility(Y, reference, ip, stain)
        img = _record(Y, ip, rn)
        # draws made (the most visible is kept) and the contrast gain it then needed (1 when none)
        vis = {**v, "subtle": subtle, "visibility_draws": draw + 1, "contrast_gain": gain}
    params.update(geo)
    params.update(vis)
    params.update({k: v for k, v in ip.items() if not k.startswith("_")})
    return img, {k: _py(v) for k, v in params.items()}


def _slug(cls: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", cls.lower()).strip("_")


def _progress(enabled: bool, total: int):
    from tqdm import tqdm  # a console bar (tqdm.auto would warn in kernels without ipywidgets)

    return tqdm(total=total, desc="render", unit="img", disable=not enabled)


def _render_task(task):
    seed, cls, index, size, root, min_visibility, subtle_share = task
    from PIL import Image

    img, params = render_image(seed, cls, index, size=size, min_visibility=min_visibility, subtle_share=subtle_share)
    rel = f"{cls}/{_slug(cls)}_{index:04d}.png"
    Image.fromarray(img).save(os.path.join(root, rel), format="PNG", compress_level=1)
    return rel, cls, index, params


WHAT = "synthetic dataset"  # what lib.io's ownership marker calls a rendered folder


def render_dataset(out_dir, *, n_per_class: int | dict = 150, seed: int = 0, size: int = 224,
                   classes=CLASSES, workers: int = 2, progress: bool = False, finish=None,
                   min_visibility: float = MIN_VISIBILITY, subtle_share: float = SUBTLE_SHARE):
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
            tasks += [(int(seed), c, i, int(size), str(tmp), float(min_visibility), float(subtle_share))
                      for i in range(counts[c])]
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


def visibility_summary(manifest, floor: float):
    """Per defect class, from a rendering's manifest: the defects' visibility (median, 10th
    percentile), the share below the floor, the share held only to the subtle floor, how many
    draws the floor took on average, and the share whose contrast had to be raised to it."""
    import pandas as pd

    defects = manifest[manifest["class"] != "clean"]
    g = defects.groupby("class")
    return pd.DataFrame({"median visibility": g["visibility"].median(), "10th percentile": g["visibility"].quantile(0.1),
                         "below the floor": g["visibility"].apply(lambda v: float((v < floor).mean())),
                         "subtle (two-thirds floor)": g["subtle"].mean(), "draws": g["visibility_draws"].mean(),
                         "contrast raised": g["contrast_gain"].apply(lambda v: float((v > 1).mean()))}).round(2)
