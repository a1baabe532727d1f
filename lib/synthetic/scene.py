"""Synthetic SEM, the scene: a layout drawn independently of the class wherever physics allows
(line/space, contact array or planar post-CMP surface; `clean` covers every layout), then the
class's defects placed on it, redrawn until they stay visible after cropping."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from lib.synthetic.geometry import LAYOUTS, _Canvas, _F32, _Holes, _Lines, _Scene, _bicubic_matrix, _place, _upsample
from lib.synthetic.defects import _bridge, _crack, _open, _particle, _pattern_patch, _pinholes, _residue, _scratch, _via_defect


_LAYOUT_P = {"line_space": 0.5, "contact_array": 0.3, "planar": 0.2}


_CLASS_LAYOUTS = {
    "bridge": ("line_space",),
    "open": ("line_space",),
    "LER": ("line_space",),
    "vias": ("contact_array",),
    "clean": LAYOUTS,
    "others": LAYOUTS,
    "cracks": LAYOUTS,
    "CMP(scratch)": ("line_space", "planar"),
}


def _choose_layout(cls: str, u: float) -> str:
    allowed = _CLASS_LAYOUTS[cls]
    p = np.array([_LAYOUT_P[a] for a in allowed])
    cdf = np.cumsum(p / p.sum())
    return allowed[int(min(np.searchsorted(cdf, u, side="right"), len(allowed) - 1))]


def _draw_lines(cv: _Canvas, rng, params: dict) -> _Lines:
    pitch = rng.uniform(28, 80)
    cd = rng.uniform(0.4, 0.6) * pitch
    vertical = bool(rng.random() < 0.5)
    tilt = rng.uniform(-2, 2)
    phase = rng.uniform(0, pitch)
    ler3 = rng.uniform(1.5, 4.0)
    xi = rng.uniform(8, 35)
    alpha = rng.uniform(0.5, 1.0)
    rho = rng.uniform(0, 0.5)
    params.update(pitch_nm=pitch, cd_nm=cd, orientation="vertical" if vertical else "horizontal",
                  tilt_deg=tilt, ler_3sigma_nm=ler3, corr_length_nm=xi, roughness_exponent=alpha,
                  edge_correlation=rho)
    return _Lines(cv, rng, pitch, cd, tilt, phase, ler3 / 3, xi, alpha, rho)


def _build_scene(cv: _Canvas, cls: str, r_lay, r_def, params: dict) -> _Scene:
    """The class's layout (from r_lay) with its defects (from r_def); r_def None draws the same layout
    without them (the reference a defect's visibility is measured against)."""
    sc = _Scene(cv)
    layout = _choose_layout(cls, r_lay.random())
    params["layout"] = layout
    lines = holes = None
    transpose = False
    if layout == "line_space":
        lines = _draw_lines(cv, r_lay, params)
        transpose = params["orientation"] == "horizontal"
    elif layout == "contact_array":
        pitch = r_lay.uniform(40, 100)
        diam = r_lay.uniform(0.45, 0.6) * pitch
        stag = bool(r_lay.random() < 0.5)
        tilt = r_lay.uniform(-2, 2)
        pu, pv = r_lay.uniform(0, pitch, 2)
        cer3 = r_lay.uniform(1.5, 3.5)
        params.update(pitch_nm=pitch, cd_nm=diam, lattice="staggered" if stag else "square",
                      tilt_deg=tilt, cer_3sigma_nm=cer3)
        holes = _Holes(cv, r_lay, pitch, diam, stag, tilt, pu, pv, cer3 / 3)
        sc.h = holes.raster()
        transpose = bool(r_lay.random() < 0.5)
    else:  # planar: flush regions differing only in material contrast
        kind = ("stripes", "blocks", "regions")[int(np.searchsorted([0.4, 0.7], r_lay.random(), side="right"))]
        contrast = r_lay.uniform(0.04, 0.15) * (1 if r_lay.random() < 0.5 else -1)
        params.update(planar_pattern=kind, material_contrast=contrast)
        if kind == "stripes":
            pl = _draw_lines(cv, r_lay, params)
            pl.finalize()
            m = pl.raster()
            transpose = params["orientation"] == "horizontal"
        elif kind == "blocks":
            px_, py_ = r_lay.uniform(60, 200, 2)
            fx, fy = r_lay.uniform(0.3, 0.7, 2)
            ox, oy = r_lay.uniform(0, 1, 2)
            tilt = r_lay.uniform(-2, 2)
            params.update(pitch_nm=px_, tilt_deg=tilt)
            t = math.radians(tilt)
            rows, cols = cv.grid((0, cv.n2, 0, cv.n2))
            x, y = (cols + 0.5) * cv.p2, (rows + 0.5) * cv.p2
            U, V = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
            m = (np.mod(U / px_ + ox, 1.0) < fx) & (np.mod(V / py_ + oy, 1.0) < fy)
        else:
            g = ndi.gaussian_filter(r_lay.standard_normal((16, 16)), 1.5, mode="wrap").astype(_F32)
            W = _bicubic_matrix(cv.n2, 16)
            m = _upsample(g, W) > np.quantile(g, r_lay.uniform(0.3, 1.0))
        sc.mat = np.where(m, _F32(contrast), _F32(0))

    # --- defects (own random stream; imaging parameters never depend on them) ---
    if r_def is None:
        if lines is not None:
            lines.finalize()
            sc.h = lines.raster().astype(_F32)
        if transpose:
            sc.transpose()
        return sc
    n_def = int(r_def.integers(1, 4))
    kinds: list[str] = []
    count = 0
    if cls == "LER":
        sig = r_def.uniform(7, 14) / 3
        frac = r_def.uniform(0.5, 1.0)
        vis = lines.visible_lines()
        nv = int(math.ceil(frac * vis.size))
        rough = set(r_def.choice(vis, nv, replace=False).tolist()) if vis.size else set()
        rest = [k for k in range(lines.nl) if k not in rough and r_def.random() < frac]
        lines.sig[list(rough) + rest] = sig
        params.update(ler_defect_3sigma_nm=3 * sig, ler_rough_fraction=frac)
        kinds.append("LER")
        count = nv
    if lines is not None:
        lines.finalize()
        sc.h = lines.raster().astype(_F32)
    if cls == "bridge":
        for _ in range(n_def):
            count += _place(cv, lambda: _bridge(sc, lines, r_def))
        kinds.append("bridge")
    elif cls == "open":
        for _ in range(n_def):
            pinch = bool(r_def.random() < 0.3)
            count += _place(cv, lambda: _open(sc, lines, r_def, pinch))
            kinds.append("open/pinch" if pinch else "open/gap")
    elif cls == "vias":
        used: set = set()
        for _ in range(n_def):
            kind = ("missing", "merged", "misshaped", "undersized", "oversized")[int(r_def.integers(5))]
            count += _place(cv, lambda: _via_defect(sc, holes, r_def, kind, used))
            kinds.append("vias/" + kind)
    elif cls == "CMP(scratch)":
        sc.groove_dark = r_def.uniform(0.4, 0.75)
        for _ in range(n_def):
            count += _place(cv, lambda: _scratch(sc, r_def))
        kinds.append("CMP(scratch)")
    elif cls == "cracks":
        sc.groove_dark = r_def.uniform(0.1, 0.35)  # deep, narrow: few SEs escape its floor
        for _ in range(n_def):
            count += _place(cv, lambda: _crack(sc, r_def))
        kinds.append("cracks")
    elif cls == "others":
        sc.groove_dark = r_def.uniform(0.1, 0.35)  # pinholes: deep pits
        # never something that looks like another class (no missing holes in arrays, no pits on lines)
        menu = {"line_space": (("particle", "residue", "missing_pattern", "collapse"), (0.35, 0.25, 0.2, 0.2)),
                "contact_array": (("particle", "residue"), (0.6, 0.4)),
                "planar": (("particle", "residue", "pinholes"), (0.45, 0.3, 0.25))}[layout]
        # what the defects are comes from the layout's stream, so a redraw for visibility (a new r_def)
        # changes where and how strong they are, never what they are: faint stains stay stains
        r_kind = np.random.default_rng(int(r_lay.integers(2**32)))
        for _ in range(int(r_kind.integers(1, 4))):
            kind = menu[0][int(np.searchsorted(np.cumsum(menu[1]), r_kind.random() * 0.999999, side="right"))]
            if kind == "particle":
                count += _place(cv, lambda: _particle(sc, r_def, (8, 40)))
            elif kind == "residue":
                count += _place(cv, lambda: _residue(sc, r_def))
            elif kind == "pinholes":
                count += _place(cv, lambda: _pinholes(sc, r_def))
            else:
                coll = kind == "collapse"
                count += _place(cv, lambda: _pattern_patch(sc, lines, r_def, coll))
            kinds.append("others/" + kind)
    params["defect"] = "+".join(dict.fromkeys(kinds)) if kinds else "none"
    params["n_defects"] = int(count)
    if transpose:
        sc.transpose()
    return sc
