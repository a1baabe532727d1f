"""Procedural generator of synthetic top-down SEM wafer-defect images (the default dataset).

Renders 8-bit grayscale images of line/space, contact-array and planar patterns with one of the
8 defect classes, following the recipe in docs/sem-synthesis.md: nm geometry with Mack-Thorsos
line-edge roughness, defect geometries, then the SEM image-formation chain (secondary-electron
yield with edge effect, texture, background, beam blur, scan distortion, charging, shot and
detector noise, output contrast). Every image is a pure function of (seed, class, index).
"""

from __future__ import annotations

import functools
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
from scipy import fft as _sfft
from scipy import ndimage as ndi

__all__ = ["CLASSES", "LAYOUTS", "image_seed", "render_image", "render_dataset"]

CLASSES: tuple[str, ...] = ("bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias")
LAYOUTS: tuple[str, ...] = ("line_space", "contact_array", "planar")

_F32 = np.float32
_MARGIN = 16  # px rendered around the final image, cropped after the scan-distortion step
_REF_SIZE = 224  # pixel quantities in the recipe (defect sizes, widths) refer to a 224 px image
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
_FRAMES = (1, 2, 4, 8, 16, 32)
_SNR_RANGE = (1.5, 15.0)
_MAX_TRIES = 30


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
def _check_class(cls) -> None:
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


def _words(x: int, name: str) -> list[int]:
    x = int(x)
    if not 0 <= x < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {x}")
    return [x & 0xFFFFFFFF, x >> 32]


def image_seed(seed: int, cls: str, index: int) -> int:
    """Per-image seed, a pure function of (global seed, class, index).

    Built with numpy's SeedSequence from fixed-width words of the seed, the CRC-32 of the class
    name and the index, so it does not depend on Python's hash randomisation or on class order.
    """
    _check_class(cls)
    entropy = _words(seed, "seed") + [zlib.crc32(cls.encode("utf-8"))] + _words(index, "index")
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


# --------------------------------------------------------------------------------------------
# small numerical helpers
# --------------------------------------------------------------------------------------------
def _mt_profiles(rng, n: int, length: int, dx: float, xi: float, alpha: float) -> np.ndarray:
    """n unit-sigma rough-edge profiles (Mack-Thorsos synthesis of the Palasantzas PSD).

    PSD(f) = 2 s^2 xi / (1 + (2 pi f xi)^2)^(alpha + 1/2); complex Gaussian coefficients scaled by
    sqrt(PSD), DC zeroed, inverse real FFT, then rescaled to exactly unit sigma (the caller
    multiplies by sigma).
    """
    length = max(int(length), 8)
    f = np.fft.rfftfreq(length, d=dx)
    amp = np.sqrt(2.0 * xi / (1.0 + (2.0 * np.pi * f * xi) ** 2) ** (alpha + 0.5))
    coef = (rng.standard_normal((n, f.size)) + 1j * rng.standard_normal((n, f.size))) * amp
    coef[:, 0] = 0.0
    prof = np.fft.irfft(coef, n=length, axis=1)
    prof -= prof.mean(axis=1, keepdims=True)
    sd = prof.std(axis=1, keepdims=True)
    return prof / np.where(sd > 0, sd, 1.0)


def _soft_clip(x: np.ndarray, lo: float, hi: float, knee: float = 0.6) -> np.ndarray:
    """Clamp x smoothly into (lo, hi) (lo < 0 < hi): identity up to knee*bound, tanh beyond."""
    y = np.array(x, dtype=np.float64, copy=True)
    k, w = knee * hi, (1.0 - knee) * hi
    m = y > k
    y[m] = k + w * np.tanh((y[m] - k) / w)
    k, w = knee * lo, (1.0 - knee) * (-lo)
    m = y < k
    y[m] = k - w * np.tanh((k - y[m]) / w)
    return y


def _inner_boundary(t: np.ndarray) -> np.ndarray:
    """Pixels of mask t that have a 4-neighbour outside t (inside the array)."""
    er = t.copy()
    er[1:, :] &= t[:-1, :]
    er[:-1, :] &= t[1:, :]
    er[:, 1:] &= t[:, :-1]
    er[:, :-1] &= t[:, 1:]
    return t & ~er


def _stamp(mask: np.ndarray, pts: np.ndarray, rad: np.ndarray) -> None:
    """Set the pixels of mask within rad[i] of pts[i] (fine-pixel index coordinates) to True."""
    if len(pts) == 0:
        return
    rad = np.maximum(np.asarray(rad, dtype=np.float64), 0.5)
    rmax = int(math.ceil(rad.max()))
    o = np.arange(-rmax, rmax + 1)
    oy, ox = (a.ravel() for a in np.meshgrid(o, o, indexing="ij"))
    base = np.floor(pts + 0.5).astype(np.intp)
    fy = base[:, :1] + oy[None, :]
    fx = base[:, 1:] + ox[None, :]
    sel = (fy - pts[:, :1]) ** 2 + (fx - pts[:, 1:]) ** 2 <= rad[:, None] ** 2
    sel &= (fy >= 0) & (fy < mask.shape[0]) & (fx >= 0) & (fx < mask.shape[1])
    mask[fy[sel], fx[sel]] = True


def _densify(pts: np.ndarray, vals: np.ndarray, factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    n = len(pts)
    if n < 2:
        return pts, vals
    t = np.linspace(0, n - 1, (n - 1) * factor + 1)
    i = np.arange(n)
    p = np.stack([np.interp(t, i, pts[:, 0]), np.interp(t, i, pts[:, 1])], axis=1)
    return p, np.interp(t, i, vals)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Small matrix product without BLAS (whose idle threads would spin in worker processes)."""
    return np.einsum("ik,kj->ij", a, b)


def _upsample(grid: np.ndarray, W: np.ndarray) -> np.ndarray:
    return _mm(_mm(W, grid), W.T)


@functools.lru_cache(maxsize=8)
def _bicubic_matrix(n: int, k: int = 5) -> np.ndarray:
    """(n, k) matrix of cubic-spline upsampling weights (separable, so bg = W @ grid @ W.T)."""
    return ndi.zoom(np.eye(k), (n / k, 1), order=3, grid_mode=True, mode="nearest").astype(_F32)


def _lowharm(rng, kmax: int, amp: float) -> tuple[np.ndarray, np.ndarray]:
    ks = np.arange(2, kmax + 1)
    return rng.uniform(0, amp, ks.size) / (ks - 1), rng.uniform(0, 2 * np.pi, ks.size)


def _harm_eval(phi: np.ndarray, b: np.ndarray, ph: np.ndarray) -> np.ndarray:
    out = np.ones_like(phi)
    for k, (bk, pk) in enumerate(zip(b, ph), start=2):
        out += bk * np.cos(k * phi + pk)
    return out


# --------------------------------------------------------------------------------------------
# canvas and scene
# --------------------------------------------------------------------------------------------
class _Canvas:
    """Geometry of the render: final image plus margin, rasterised at 2x ("fine" pixels)."""

    def __init__(self, size: int, pixel_nm: float):
        self.size = size
        self.n1 = size + 2 * _MARGIN
        self.n2 = 2 * self.n1
        self.p = pixel_nm
        self.p2 = pixel_nm / 2.0
        self.s = size / _REF_SIZE
        self.c0, self.c1 = 2 * _MARGIN, 2 * (_MARGIN + size)
        self.lo = self.c0 + 0.15 * 2 * size
        self.hi = self.c0 + 0.85 * 2 * size
        self.min_area = max(6.0, 40.0 * self.s**2)  # final px

    def rand_point(self, rng) -> tuple[float, float]:
        r, c = rng.uniform(self.lo, self.hi, 2)
        return float(r), float(c)

    def central(self, row: float, col: float) -> bool:
        return self.lo <= row <= self.hi and self.lo <= col <= self.hi

    def window(self, row, col, half_r, half_c=None):
        half_c = half_r if half_c is None else half_c
        n = self.n2
        r0 = min(max(int(math.floor(row - half_r)), 0), n - 1)
        r1 = min(max(int(math.ceil(row + half_r)) + 1, r0 + 1), n)
        c0 = min(max(int(math.floor(col - half_c)), 0), n - 1)
        c1 = min(max(int(math.ceil(col + half_c)) + 1, c0 + 1), n)
        return (r0, r1, c0, c1)

    def visible(self, fp: np.ndarray, win) -> float:
        """Final-image pixels of footprint fp (in window win) that survive the crop."""
        r0, r1, c0, c1 = win
        a0, a1 = max(self.c0, r0), min(self.c1, r1)
        b0, b1 = max(self.c0, c0), min(self.c1, c1)
        if a1 <= a0 or b1 <= b0:
            return 0.0
        return float(np.count_nonzero(fp[a0 - r0:a1 - r0, b0 - c0:b1 - c0])) / 4.0

    def grid(self, win):
        r0, r1, c0, c1 = win
        return (np.arange(r0, r1, dtype=_F32)[:, None], np.arange(c0, c1, dtype=_F32)[None, :])


class _Scene:
    """Fine-resolution maps the image-formation step reads (built in a 'vertical' frame)."""

    def __init__(self, cv: _Canvas):
        self.cv = cv
        self.h = np.ones((cv.n2, cv.n2), _F32)  # topography in [0, 1]: 1 = top surface
        self.mat = None  # material contrast added to c_top (planar)
        self.groove = None  # bool: grooves below the bottom level (scratches, cracks, pits)
        self.pmask = None  # bool: particles
        self.pY = None  # particle shading (multiplies c_top)
        self.mult = None  # multiplicative brightness (shadows, stains, faint scratches)
        self.groove_dark = 0.6

    def _lazy(self, name, dtype, fill):
        if getattr(self, name) is None:
            setattr(self, name, np.full((self.cv.n2, self.cv.n2), fill, dtype))
        return getattr(self, name)

    def groove_map(self):
        return self._lazy("groove", bool, False)

    def mult_map(self):
        return self._lazy("mult", _F32, 1.0)

    def transpose(self):
        for name in ("h", "mat", "groove", "pmask", "pY", "mult"):
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, np.ascontiguousarray(a.T))


def _place(cv: _Canvas, attempt) -> int:
    """Redraw a defect until it is visible enough after cropping; returns 1 if one was committed.

    Positions keep >= 15 % from the border; only the last third of the attempts may use the whole
    crop (needed for small images whose central 70 % can be narrower than a pitch).
    """
    best = None
    lo, hi = cv.lo, cv.hi
    try:
        for k in range(_MAX_TRIES):
            if k == 2 * _MAX_TRIES // 3:
                cv.lo, cv.hi = cv.c0 + 2.0, cv.c1 - 2.0
            res = attempt()
            if res is None:
                continue
            area, commit = res
            if area >= cv.min_area:
                commit()
                return 1
            if best is None or area > best[0]:
                best = res
    finally:
        cv.lo, cv.hi = lo, hi
    if best is not None and best[0] > 0:
        best[1]()
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# line / space geometry
# --------------------------------------------------------------------------------------------
class _Lines:
    """Vertical lines (before an optional transpose), tilted, with rough edges in nm."""

    def __init__(self, cv: _Canvas, rng, pitch, cd, tilt_deg, phase, sigma, xi, alpha, rho):
        self.cv, self.P, self.CD, self.S = cv, pitch, cd, pitch - cd
        self.sigma, self.xi, self.alpha = sigma, xi, alpha
        t = math.radians(tilt_deg)
        self.c, self.s = math.cos(t), math.sin(t)
        side = cv.n2 * cv.p2
        xs, ys = np.array([0.0, side, 0.0, side]), np.array([0.0, 0.0, side, side])
        us, vs = xs * self.c + ys * self.s, -xs * self.s + ys * self.c
        self.phase = phase
        self.kmin = int(math.floor((us.min() - phase) / pitch)) - 1
        kmax = int(math.ceil((us.max() - phase) / pitch)) + 1
        self.nl = kmax - self.kmin + 1
        self.centres = phase + (self.kmin + np.arange(self.nl)) * pitch
        self.vmin = vs.min() - 2 * cv.p2
        self.nv = int(math.ceil((vs.max() - self.vmin) / cv.p2)) + 3
        units = _mt_profiles(rng, 2 * self.nl, self.nv, cv.p2, xi, alpha)
        ul, ur = units[: self.nl], units[self.nl:]
        ur = rho * ul + math.sqrt(1.0 - rho * rho) * ur
        ur /= ur.std(axis=1, keepdims=True)
        self.unit_l, self.unit_r = ul, ur
        self.sig = np.full(self.nl, sigma)
        self.eL = self.eR = None

    def finalize(self):
        """Scale the unit profiles by each line's sigma, then clamp (width >= 0.3 CD, space >= 0.3 S)."""
        eL = self.unit_l * self.sig[:, None]
        eR = self.unit_r * self.sig[:, None]
        self.eL = _soft_clip(eL, -0.35 * self.S, 0.35 * self.CD).astype(_F32)
        self.eR = _soft_clip(eR, -0.35 * self.CD, 0.35 * self.S).astype(_F32)

    def uv(self, rows, cols):
        x, y = (cols + 0.5) * self.cv.p2, (rows + 0.5) * self.cv.p2
        return x * self.c + y * self.s, -x * self.s + y * self.c

    def to_rc(self, u, v):
        x, y = u * self.c - v * self.s, u * self.s + v * self.c
        return y / self.cv.p2 - 0.5, x / self.cv.p2 - 0.5

    def ivr(self, rows):
        """Edge-profile sample index of fine-pixel rows.

        Profiles are indexed by y*cos(tilt) rather than the rotated v = y cos - x sin: along one
        line x is nearly constant, so this only shifts each line's (random) profile by a constant.
        """
        v = (np.asarray(rows, dtype=np.float64) + 0.5) * self.cv.p2 * self.c
        return np.clip(np.rint((v - self.vmin) / self.cv.p2).astype(np.intp), 0, self.nv - 1)

    def raster(self) -> np.ndarray:
        """Line mask on the fine grid: per-row column intervals, filled by a difference array."""
        n, p2 = self.cv.n2, self.cv.p2
        r = np.arange(n)
        iv = self.ivr(r)
        ys = ((r + 0.5) * p2 * self.s)[None, :]
        hw = 0.5 * self.CD
        xs = (self.centres[:, None] - hw + self.eL[:, iv] - ys) / self.c
        xe = (self.centres[:, None] + hw + self.eR[:, iv] - ys) / self.c
        cs = np.clip(np.ceil(xs / p2 - 0.5), 0, n).astype(np.intp)
        ce = np.clip(np.ceil(xe / p2 - 0.5), 0, n).astype(np.intp)
        ce = np.maximum(ce, cs)
        base = r[None, :] * (n + 1)
        diff = np.bincount((base + cs).ravel(), minlength=n * (n + 1))
        diff -= np.bincount((base + ce).ravel(), minlength=n * (n + 1))
        return np.cumsum(diff.reshape(n, n + 1), axis=1)[:, :n] > 0

    def line_index(self, u):
        return int(np.clip(round((u - self.centres[0]) / self.P), 1, self.nl - 2))

    def visible_lines(self):
        cv = self.cv
        a, b = (cv.c0 + 0.5) * cv.p2, (cv.c1 - 0.5) * cv.p2
        xs, ys = np.array([a, b, a, b]), np.array([a, a, b, b])
        us = xs * self.c + ys * self.s
        return np.nonzero((self.centres > us.min()) & (self.centres < us.max()))[0]

    def _local(self, uc, v0, hu, hv):
        """Window and (U, V) grids around the point (uc, v0) covering |du|<hu, |dv|<hv (nm)."""
        cv = self.cv
        rr, cc = self.to_rc(uc, v0)
        hr = (hv + hu * abs(self.s)) / cv.p2 + 2
        hc = (hu + hv * abs(self.s)) / cv.p2 + 2
        win = cv.window(rr, cc, hr, hc)
        rows, cols = cv.grid(win)
        U, V = self.uv(rows, cols)
        return win, U, V, self.ivr(rows)

    def _side_profiles(self, rng, n, hu, scale=1.0):
        nu = int(2 * hu / self.cv.p2) + 4
        return _mt_profiles(rng, n, nu, self.cv.p2, self.xi, self.alpha) * self.sigma * scale

    def _pick(self, rng, in_space):
        u0, v0 = self.uv(*self.cv.rand_point(rng))
        if in_space:
            li = int(np.clip(math.floor((u0 - self.centres[0]) / self.P), 0, self.nl - 2))
            uc = self.centres[li] + 0.5 * self.P
        else:
            li = self.line_index(u0)
            uc = self.centres[li]
        if not self.cv.central(*self.to_rc(uc, v0)):
            return None
        return li, uc, v0


def _bridge(sc: _Scene, L: _Lines, rng):
    pk = L._pick(rng, in_space=True)
    if pk is None:
        return None
    li, uc, v0 = pk
    w0 = rng.uniform(0.3, 1.5) * L.CD
    widen = rng.uniform(0.3, 1.0) if rng.random() < 0.5 else 0.0
    hb = 1.0 if rng.random() < 0.6 else rng.uniform(0.5, 0.8)  # full height or dim micro-bridge
    hu = L.P
    hv = 0.5 * w0 * (1 + widen) + 4 * L.sigma + 2 * L.cv.p2
    win, U, V, iv = L._local(uc, v0, hu, hv)
    R = L.centres[li] + 0.5 * L.CD + L.eR[li][iv]
    Ln = L.centres[li + 1] - 0.5 * L.CD + L.eL[li + 1][iv]
    ov = 0.2 * L.CD
    q = (U - uc) / (0.5 * L.S)
    w = w0 * (1.0 + widen * np.minimum(q * q, 1.0))
    eT, eB = L._side_profiles(rng, 2, hu)
    iu = np.clip(np.rint((U - (uc - hu)) / L.cv.p2).astype(np.intp), 0, eT.size - 1)
    dv = V - v0
    reg = (U > R - ov) & (U < Ln + ov) & (dv < 0.5 * w + eT[iu]) & (dv > -0.5 * w + eB[iu])
    r0, r1, c0, c1 = win
    sub = sc.h[r0:r1, c0:c1]
    new = np.maximum(sub, np.where(reg, _F32(hb), _F32(0)))
    fp = new != sub

    def commit():
        sc.h[r0:r1, c0:c1] = new

    return sc.cv.visible(fp, win), commit


def _open(sc: _Scene, L: _Lines, rng, pinch: bool):
    pk = L._pick(rng, in_space=False)
    if pk is None:
        return None
    li, uc, v0 = pk
    cd, hu = L.CD, 0.5 * L.P
    if pinch:
        ell = rng.uniform(1.0, 2.0) * cd  # FWHM of the narrowing
        frac = rng.uniform(0.0, 0.2)
        asym = rng.uniform(-1, 1) if rng.random() < 0.5 else 0.0
        win, U, V, iv = L._local(uc, v0, hu, ell + 2 * L.cv.p2)
        le = uc - 0.5 * cd + L.eL[li][iv]
        re = uc + 0.5 * cd + L.eR[li][iv]
        dv = V - v0
        wnd = np.where(np.abs(dv) < ell, np.cos(np.pi * dv / (2 * ell)) ** 2, 0).astype(_F32)
        delta = np.maximum(re - le - frac * cd, 0) * wnd
        cut = (np.abs(U - uc) < hu) & (np.abs(dv) < ell)
        cut &= (U < le + 0.5 * (1 + asym) * delta) | (U > re - 0.5 * (1 - asym) * delta)
    else:
        gap = rng.uniform(0.5, 3.0) * cd
        kappa = rng.uniform(0.5, 1.0)
        i0 = int(L.ivr(L.to_rc(uc, v0)[0]))
        lc = uc + 0.5 * (L.eL[li][i0] + L.eR[li][i0])
        hw = max(0.5 * (cd + L.eR[li][i0] - L.eL[li][i0]), 0.5 * L.cv.p2)
        win, U, V, _ = L._local(uc, v0, hu, 0.5 * gap + kappa * hw + 4 * L.sigma + 2 * L.cv.p2)
        q = np.clip((U - lc) / hw, -1, 1)
        cap = kappa * hw * (1 - np.sqrt(1 - q * q))
        eT, eB = L._side_profiles(rng, 2, hu, 0.8)
        iu = np.clip(np.rint((U - (uc - hu)) / L.cv.p2).astype(np.intp), 0, eT.size - 1)
        dv = V - v0
        cut = (np.abs(U - uc) < hu) & (dv < 0.5 * gap + cap + eT[iu]) & (dv > -(0.5 * gap + cap + eB[iu]))
    r0, r1, c0, c1 = win
    sub = sc.h[r0:r1, c0:c1]
    new = np.where(cut, _F32(0), sub)
    fp = new != sub

    def commit():
        sc.h[r0:r1, c0:c1] = new

    return sc.cv.visible(fp, win), commit


def _blob(rng, win_shape, cy, cx, radius, harm=0.25):
    """Irregular blob (radius in fine px, outline with low harmonics) in a local window."""
    yy = np.arange(win_shape[0], dtype=_F32)[:, None] - cy
    xx = np.arange(win_shape[1], dtype=_F32)[None, :] - cx
    b, ph = _lowharm(rng, 5, harm)
    return np.hypot(yy, xx) < radius * _harm_eval(np.arctan2(yy, xx), b, ph)


def _pattern_patch(sc: _Scene, L: _Lines, rng, collapse: bool):
    """others: a patch of missing pattern, or of collapsed (fallen, meandering) lines."""
    cv = sc.cv
    row, col = cv.rand_point(rng)
    rad = min(rng.uniform(1.5, 3.0) * L.P / cv.p2, rng.uniform(0.15, 0.3) * 2 * cv.size)
    win = cv.window(row, col, rad * 1.5 + 2)
    r0, r1, c0, c1 = win
    sub = sc.h[r0:r1, c0:c1]
    blob = _blob(rng, sub.shape, row - r0, col - c0, rad)
    if collapse:  # fallen lines: leaning, meandering, touching their neighbours
        rows, cols = cv.grid(win)
        U, V = L.uv(rows, cols)
        noise = rng.standard_normal(sub.shape)
        corr = rng.uniform(0.5, 1.5) * L.P / cv.p2
        f = np.fft.irfft2(ndi.fourier_gaussian(np.fft.rfft2(noise), corr, n=sub.shape[1]), s=sub.shape)
        f /= max(float(f.std()), 1e-9)
        lean = rng.uniform(0.3, 1.2) * (1 if rng.random() < 0.5 else -1)
        vc = float(V.mean())
        Up = U + rng.uniform(0.5, 1.2) * L.P * f.astype(_F32) + lean * (V - vc)
        repl = (np.mod((Up - L.centres[0]) / L.P + 0.5 * L.CD / L.P, 1.0) < L.CD / L.P).astype(_F32)
    else:
        repl = np.zeros_like(sub)
    new = np.where(blob, repl, sub)
    fp = new != sub

    def commit():
        sc.h[r0:r1, c0:c1] = new

    return cv.visible(fp, win), commit


# --------------------------------------------------------------------------------------------
# contact / via arrays
# --------------------------------------------------------------------------------------------
class _Holes:
    """Square or staggered lattice of dark holes with harmonic contact-edge roughness."""

    NT = 64

    def __init__(self, cv: _Canvas, rng, pitch, diam, staggered, tilt_deg, phase_u, phase_v, cer_sigma):
        self.cv, self.P, self.D, self.stag = cv, pitch, diam, staggered
        self.r0 = 0.5 * diam
        t = math.radians(tilt_deg)
        self.c, self.s = math.cos(t), math.sin(t)
        self.pu, self.pv = phase_u, phase_v
        side = cv.n2 * cv.p2
        xs, ys = np.array([0.0, side, 0.0, side]), np.array([0.0, 0.0, side, side])
        us, vs = xs * self.c + ys * self.s, -xs * self.s + ys * self.c
        self.jmin = int(math.floor((vs.min() - phase_v) / pitch)) - 1
        self.imin = int(math.floor((us.min() - phase_u) / pitch)) - 2
        self.nj = int(math.ceil((vs.max() - phase_v) / pitch)) + 1 - self.jmin + 1
        self.ni = int(math.ceil((us.max() - phase_u) / pitch)) + 2 - self.imin + 1
        n = self.nj * self.ni
        ks = np.arange(2, 9)
        a = rng.standard_normal((n, ks.size)) / ks[None, :] ** 1.5
        a *= cer_sigma / np.sqrt(0.5 * (a * a).sum(axis=1, keepdims=True))
        phs = rng.uniform(0, 2 * np.pi, (n, ks.size))
        eps = rng.normal(0, 0.02, n)
        self.a, self.phs, self.eps = a, phs, eps
        th = np.linspace(0, 2 * np.pi, self.NT, endpoint=False)
        self.table = self.r0 * (1 + eps[:, None]) + np.einsum(
            "nk,nkt->nt", a, np.cos(ks[None, :, None] * th[None, None, :] + phs[:, :, None]))
        self.rlo, self.rhi = float(self.table.min()), float(self.table.max())

    def shift(self, j):
        return (j % 2) * 0.5 * self.P if self.stag else 0.0

    def site_uv(self, i, j):
        return self.pu + self.shift(j) + i * self.P, self.pv + j * self.P

    def to_rc(self, u, v):
        x, y = u * self.c - v * self.s, u * self.s + v * self.c
        return y / self.cv.p2 - 0.5, x / self.cv.p2 - 0.5

    def raster(self) -> np.ndarray:
        """Height map (holes = 0): every hole drawn in its own small patch, all patches at once."""
        cv = self.cv
        n, p2 = cv.n2, cv.p2
        jj, ii = np.meshgrid(np.arange(self.nj) + self.jmin, np.arange(self.ni) + self.imin, indexing="ij")
        jj, ii = jj.ravel(), ii.ravel()
        sh = (jj % 2) * 0.5 * self.P if self.stag else 0.0
        u, v = self.pu + sh + ii * self.P, self.pv + jj * self.P
        x, y = u * self.c - v * self.s, u * self.s + v * self.c
        cr, cc = y / p2 - 0.5, x / p2 - 0.5  # hole centres, fine px
        rhi = self.rhi / p2
        K = int(math.ceil(2 * rhi)) + 3
        keep = (cr > -rhi) & (cr < n + rhi) & (cc > -rhi) & (cc < n + rhi)
        hid = np.nonzero(keep)[0]
        cr, cc = cr[keep], cc[keep]
        br = np.floor(cr - 0.5 * K).astype(np.intp)
        bc = np.floor(cc - 0.5 * K).astype(np.intp)
        o = np.arange(K)
        py, px = br[:, None] + o, bc[:, None] + o  # (nh, K)
        dy = (py - cr[:, None]).astype(_F32)[:, :, None]
        dx = (px - cc[:, None]).astype(_F32)[:, None, :]
        rr = dy * dy + dx * dx  # (nh, K, K)
        tab = self.table[hid] / p2
        rlo = float(tab.min())
        hole = rr < rlo * rlo
        band = ~hole & (rr <= rhi * rhi)
        bh, by, bx = np.nonzero(band)
        t = (np.arctan2(dy[bh, by, 0], dx[bh, 0, bx]) * (self.NT / (2 * np.pi))) % self.NT
        t0 = np.floor(t).astype(np.intp)
        fr = t - t0
        rth = tab[bh, t0 % self.NT] * (1 - fr) + tab[bh, (t0 + 1) % self.NT] * fr
        hole[bh, by, bx] = np.sqrt(rr[bh, by, bx]) < rth
        hh, hy, hx = np.nonzero(hole)
        ry, rx = py[hh, hy], px[hh, hx]
        ok = (ry >= 0) & (ry < n) & (rx >= 0) & (rx < n)
        h = np.ones((n, n), _F32)
        h[ry[ok], rx[ok]] = 0
        return h

    def hole_table(self, i, j):
        hid = int(np.clip((j - self.jmin) * self.ni + (i - self.imin), 0, self.table.shape[0] - 1))
        return self.table[hid]

    def pick_site(self, rng, used):
        cv = self.cv
        row, col = cv.rand_point(rng)
        x, y = (col + 0.5) * cv.p2, (row + 0.5) * cv.p2
        u, v = x * self.c + y * self.s, -x * self.s + y * self.c
        j = int(round((v - self.pv) / self.P))
        i = int(round((u - self.pu - self.shift(j)) / self.P))
        rc = self.to_rc(*self.site_uv(i, j))
        if (i, j) in used or not cv.central(*rc):
            return None
        return i, j, rc


def _polar(shape, cy, cx, rfun):
    yy = np.arange(shape[0], dtype=_F32)[:, None] - cy
    xx = np.arange(shape[1], dtype=_F32)[None, :] - cx
    return np.hypot(yy, xx) < rfun(np.arctan2(yy, xx))


def _table_fun(table):
    nt = table.size

    def f(phi):
        t = (phi * (nt / (2 * np.pi))) % nt
        t0 = np.floor(t).astype(np.intp)
        fr = t - t0
        return table[t0 % nt] * (1 - fr) + table[(t0 + 1) % nt] * fr

    return f


def _via_defect(sc: _Scene, H: _Holes, rng, kind: str, used: set):
    cv = sc.cv
    pk = H.pick_site(rng, used)
    if pk is None:
        return None
    i, j, (cy, cx) = pk
    p2 = cv.p2
    tab = H.hole_table(i, j) / p2  # fine px
    extra = {"missing": 0.0, "undersized": 0.0, "oversized": 0.8, "misshaped": 1.0, "merged": 1.0}[kind]
    half = (H.rhi / p2) * (1.0 + extra) + H.P / p2 * (1.2 if kind == "merged" else 0.0) + 4
    win = cv.window(cy, cx, half)
    r0, r1, c0, c1 = win
    sub = sc.h[r0:r1, c0:c1]
    ly, lx = cy - r0, cx - c0
    new = sub.copy()
    erase = _polar(sub.shape, ly, lx, lambda ph: np.full_like(ph, H.rhi / p2 + 1.5))
    partner = None
    if kind == "missing":
        new[erase] = 1
    elif kind in ("undersized", "oversized"):
        f = rng.uniform(0.3, 0.6) if kind == "undersized" else rng.uniform(1.4, 1.7)
        new[erase] = 1
        new[_polar(sub.shape, ly, lx, _table_fun(tab * f))] = 0
    elif kind == "misshaped":
        new[erase] = 1
        r = float(tab.mean())
        if rng.random() < 0.5:
            asp = rng.uniform(1.4, 2.5)
            ang = rng.uniform(0, np.pi)
            a_, b_ = r * math.sqrt(asp), r / math.sqrt(asp)

            def rf(ph):
                c, s = np.cos(ph - ang), np.sin(ph - ang)
                return a_ * b_ / np.sqrt((b_ * c) ** 2 + (a_ * s) ** 2)
        else:
            b, phh = _lowharm(rng, 4, 0.3)
            b[0] = max(b[0], 0.15)
            base = _table_fun(tab)

            def rf(ph):
                return base(ph) * _harm_eval(ph, b, phh)
        new[_polar(sub.shape, ly, lx, rf)] = 0
    else:  # merged: joined to a neighbour by a neck
        nbrs = [(i + 1, j), (i - 1, j)]
        if H.stag:
            o = 1 if j % 2 else 0
            nbrs += [(i + o, j + 1), (i + o - 1, j + 1), (i + o, j - 1), (i + o - 1, j - 1)]
        else:
            nbrs += [(i, j + 1), (i, j - 1)]
        partner = nbrs[int(rng.integers(len(nbrs)))]
        py, px = H.to_rc(*H.site_uv(*partner))
        py, px = py - r0, px - c0
        wneck = rng.uniform(0.5, 0.9) * H.D / p2
        yy = np.arange(sub.shape[0], dtype=_F32)[:, None]
        xx = np.arange(sub.shape[1], dtype=_F32)[None, :]
        vy, vx = py - ly, px - lx
        t = np.clip(((yy - ly) * vy + (xx - lx) * vx) / (vy * vy + vx * vx), 0, 1)
        d = np.hypot(yy - ly - t * vy, xx - lx - t * vx)
        new[d < 0.5 * wneck] = 0
    fp = new != sub

    def commit():
        sc.h[r0:r1, c0:c1] = new
        used.add((i, j))
        if partner is not None:
            used.add(partner)

    return cv.visible(fp, win), commit


# --------------------------------------------------------------------------------------------
# defects drawn on any layout
# --------------------------------------------------------------------------------------------
def _particle(sc: _Scene, rng, radius_px, center=None, shadow=True):
    """Particle: bright body with a strong rim (tilted sphere surface), shadow on one side."""
    cv = sc.cv
    cy, cx = center if center is not None else cv.rand_point(rng)
    R0 = rng.uniform(*radius_px) * cv.s * 2.0
    R0 = max(R0, 1.5)
    b, ph = _lowharm(rng, 4, 0.25)
    ds = rng.uniform(2, 5) * cv.s * 2.0 if shadow else 0.0
    ang = rng.uniform(0, 2 * np.pi)
    cp = rng.uniform(0.9, 1.3)
    krim = rng.uniform(0.3, 0.7)
    sf = rng.uniform(0.35, 0.7)
    half = R0 * (1 + b.sum()) + ds + 3
    win = cv.window(cy, cx, half)
    r0, r1, c0, c1 = win
    yy = np.arange(r0, r1, dtype=_F32)[:, None] - cy
    xx = np.arange(c0, c1, dtype=_F32)[None, :] - cx
    rho = np.hypot(yy, xx) / (R0 * _harm_eval(np.arctan2(yy, xx), b, ph))
    P = rho < 1
    # SE yield of a tilted surface ~ 1/cos(tilt): brightest at the rim (clamped at cos = 0.3)
    shade = (cp * (1 + krim * (1 / np.sqrt(np.maximum(1 - rho * rho, 0.09)) - 1))).astype(_F32)
    if ds > 0:
        sy, sx = yy - ds * math.sin(ang), xx - ds * math.cos(ang)
        S = (np.hypot(sy, sx) / (R0 * _harm_eval(np.arctan2(sy, sx), b, ph)) < 1) & ~P
    else:
        S = np.zeros_like(P)

    def commit():
        sl = (slice(r0, r1), slice(c0, c1))
        sc.h[sl][P] = 1
        if sc.groove is not None:
            sc.groove[sl][P] = False
        pm = sc._lazy("pmask", bool, False)
        pm[sl] |= P
        py = sc._lazy("pY", _F32, 0.0)
        py[sl][P] = shade[P]
        if S.any():
            sc.mult_map()[sl][S] *= _F32(sf)

    return cv.visible(P | S, win), commit


def _residue(sc: _Scene, rng):
    """Residue/stain: thresholded smooth random field changing brightness by 10-25 %."""
    cv = sc.cv
    cy, cx = cv.rand_point(rng)
    D = rng.uniform(30, 90) * cv.s * 2.0
    delta = rng.uniform(0.10, 0.25) * (1 if rng.random() < 0.5 else -1)
    win = cv.window(cy, cx, 0.5 * D + 4)
    r0, r1, c0, c1 = win
    shape = (r1 - r0, c1 - c0)
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(_F32), max(D / 8, 1.0))
    f /= max(float(f.std()), 1e-6)
    yy = np.arange(shape[0], dtype=_F32)[:, None] - (cy - r0)
    xx = np.arange(shape[1], dtype=_F32)[None, :] - (cx - c0)
    env = np.clip(1 - (np.hypot(yy, xx) / (0.5 * D)) ** 2, 0, 1)
    m = (f + 2.5 * env) > 1.5
    soft = ndi.gaussian_filter(m.astype(_F32), 1.5)

    def commit():
        sc.mult_map()[r0:r1, c0:c1] *= 1 + _F32(delta) * soft

    return cv.visible(m, win), commit


def _pinholes(sc: _Scene, rng):
    """Cluster of small pits (planar films)."""
    cv = sc.cv
    cy, cx = cv.rand_point(rng)
    n = int(rng.integers(3, 13))
    spread = rng.uniform(15, 40) * cv.s * 2.0
    pts = np.stack([cy + rng.normal(0, 0.5 * spread, n), cx + rng.normal(0, 0.5 * spread, n)], 1)
    rad = np.maximum(rng.uniform(2, 5, n) * cv.s * 2.0, 1.0)
    half = spread * 2 + 8
    win = cv.window(cy, cx, half)
    r0, r1, c0, c1 = win
    m = np.zeros((r1 - r0, c1 - c0), bool)
    _stamp(m, pts - [r0, c0], rad)

    def commit():
        sc.groove_map()[r0:r1, c0:c1] |= m

    return cv.visible(m, win), commit


def _crack(sc: _Scene, rng):
    """Branching random walk (1 px steps), 1-3 px wide and tapering; the groove gets bright lips."""
    cv = sc.cv
    cy, cx = cv.rand_point(rng)
    length = rng.uniform(0.6, 1.0) * cv.size  # final px
    sig_h = rng.uniform(0.15, 0.3)
    kappa = rng.uniform(0.08, 0.2)
    p_br = rng.uniform(0.01, 0.03)
    w0 = max(rng.uniform(1, 3) * cv.s, 1.0)
    psi = rng.uniform(0, 2 * np.pi)
    segs: list = []

    def walk(p0, heading, n, w_start, depth):
        if n < 3 or len(segs) >= 40:
            return
        # heading noise N(0, sig_h) per step, mean-reverting towards the segment's direction
        # (AR(1), decay 1 - kappa) so that the crack stays directional and jagged
        eps = rng.normal(0, sig_h, n)
        th = heading + np.convolve(eps, (1 - kappa) ** np.arange(n))[:n]
        steps = np.stack([np.sin(th), np.cos(th)], 1) * 2.0  # 1 final px = 2 fine px
        pts = np.vstack([p0[None, :], p0[None, :] + np.cumsum(steps, 0)])
        rem = 1 - np.arange(n + 1) / (n + 1)
        w = w_start * np.minimum(1.0, rem / 0.35) ** 0.6  # tapering over the last third
        segs.append((pts, np.maximum(w, 0.5)))
        if depth < 3:
            for k in np.nonzero(rng.random(n) < p_br)[0]:
                turn = (1 if rng.random() < 0.5 else -1) * rng.uniform(0.4, 1.0)
                walk(pts[k + 1], th[k] + turn, int(rng.uniform(0.3, 0.6) * n), 0.8 * w[k + 1], depth + 1)

    p0 = np.array([cy, cx])
    half = int(length / 2)
    walk(p0, psi, half, w0, 0)
    walk(p0, psi + np.pi, int(length) - half, w0, 0)
    m = np.zeros((cv.n2, cv.n2), bool)
    for pts, w in segs:
        dp, dw = _densify(pts, w)
        _stamp(m, dp, dw)  # radius in fine px = width in final px
    win = (0, cv.n2, 0, cv.n2)

    def commit():
        sc.groove_map()[...] |= m

    return cv.visible(m, win), commit


def _scratch(sc: _Scene, rng):
    """CMP scratch: long nearly straight arc, optional chatter, fainter parallels, debris."""
    cv = sc.cv
    n2, sz2 = cv.n2, 2.0 * cv.size
    cy, cx = cv.rand_point(rng)
    psi = rng.uniform(0, np.pi)
    R = rng.uniform(1.5, 10.0) * sz2
    side = 1 if rng.random() < 0.5 else -1
    t1, t2 = rng.uniform(0.35, 1.0, 2) * sz2
    w0 = max(rng.uniform(2, 8) * cv.s * 2.0, 2.0)
    chatter = rng.random() < 0.5
    cm, cper, cph = rng.uniform(0.3, 0.8), rng.uniform(10, 40) * cv.s * 2.0, rng.uniform(0, 2 * np.pi)
    d = np.array([math.sin(psi), math.cos(psi)])
    nrm = side * np.array([d[1], -d[0]])
    C = np.array([cy, cx]) + R * nrm
    a0 = math.atan2(cy - C[0], cx - C[1])
    # angular direction of increasing arc length t (sign of the tangent relative to d)
    tang = np.array([math.cos(a0), -math.sin(a0)])  # d/da of (sin a, cos a) in (row, col)
    sgn = 1.0 if float(np.dot(tang, d)) >= 0 else -1.0
    # visible length check on samples along the arc
    ts = np.arange(-t1, t2, 2.0)
    ang = a0 + sgn * ts / R
    py, px = C[0] + R * np.sin(ang), C[1] + R * np.cos(ang)
    inside = (py >= cv.c0) & (py < cv.c1) & (px >= cv.c0) & (px < cv.c1)
    if np.count_nonzero(inside) * 2.0 < 0.7 * sz2:
        return None

    rows = (np.arange(n2) - C[0]).astype(_F32)[:, None]
    cols = (np.arange(n2) - C[1]).astype(_F32)[None, :]
    rr = np.sqrt(rows * rows + cols * cols)
    npar = int(rng.integers(0, 4))
    offs = rng.uniform(5, 30, npar) * cv.s * 2.0 * np.where(rng.random(npar) < 0.5, 1, -1)
    pw = np.maximum(rng.uniform(1, 3, npar) * cv.s * 2.0, 1.0)
    pdepth = rng.uniform(0.1, 0.3, npar)
    wmax = w0 * (1 + cm) + 2 * (np.abs(offs).max() + pw.max() if npar else 0) + 4
    bi = np.nonzero(np.abs(rr - _F32(R)) < wmax)
    dr = rr[bi].astype(np.float64) - R
    ang = np.arctan2(rows[bi[0], 0].astype(np.float64), cols[0, bi[1]].astype(np.float64))
    tt = sgn * R * (((ang - a0) + np.pi) % (2 * np.pi) - np.pi)
    along = (tt > -t1) & (tt < t2)
    w = w0 * (1 + cm * np.sin(2 * np.pi * tt / cper + cph)) if chatter else np.full_like(tt, w0)
    g = np.zeros((n2, n2), bool)
    sel = along & (np.abs(dr) < 0.5 * w)
    g[bi[0][sel], bi[1][sel]] = True
    mult = None
    if npar:
        mult = np.ones((n2, n2), _F32)
        for o, ww, dep in zip(offs, pw, pdepth):
            s2 = along & (np.abs(dr - o) < 0.5 * ww) & ~sel
            mult[bi[0][s2], bi[1][s2]] *= _F32(1 - dep)
    ndeb = int(rng.integers(0, 6))
    deb = []
    for _ in range(ndeb):
        t = rng.uniform(-t1, t2)
        a = a0 + sgn * t / R
        off = rng.normal(0, w0 + 8 * cv.s)
        deb.append(((C[0] + (R + off) * math.sin(a), C[1] + (R + off) * math.cos(a)), rng.uniform(1, 3)))
    win = (0, n2, 0, n2)

    def commit():
        sc.groove_map()[...] |= g
        if mult is not None:
            sc.mult_map()[...] *= mult
        for (pyx, rad) in deb:
            res = _particle(sc, rng, (rad, rad), center=pyx, shadow=False)
            res[1]()

    return cv.visible(g, win), commit


# --------------------------------------------------------------------------------------------
# scene construction
# --------------------------------------------------------------------------------------------
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
        for _ in range(n_def):
            kind = menu[0][int(np.searchsorted(np.cumsum(menu[1]), r_def.random() * 0.999999, side="right"))]
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


# --------------------------------------------------------------------------------------------
# image formation
# --------------------------------------------------------------------------------------------
def _draw_imaging(r) -> dict:
    """All imaging parameters, from one stream in a fixed order (identical for every class)."""
    ip: dict = {}
    ip["pixel_nm"] = r.uniform(0.7, 1.5)
    ip["c_top"] = r.uniform(0.35, 0.55)
    ip["c_bot"] = r.uniform(0.10, 0.25)
    ip["edge_amp"] = r.uniform(0.3, 0.6)
    ip["edge_lambda_nm"] = r.uniform(1.5, 5.0)
    ip["texture_amp"] = r.uniform(0.02, 0.06)
    ip["texture_sigma_nm"] = r.uniform(1.0, 4.0)
    ip["background_amp"] = r.uniform(0.03, 0.08)
    ip["_bg_grid"] = r.uniform(-1, 1, (5, 5))
    ip["beam_sigma_nm"] = r.uniform(1.0, 3.0)
    ip["astigmatism"] = r.uniform(1.0, 1.3)
    ip["astig_angle_deg"] = r.uniform(0, 180)
    ip["scan_n_sines"] = int(r.integers(3, 11))
    ip["scan_amp_px"] = r.uniform(0.2, 0.4)
    ip["_sine_amp"] = r.uniform(0, 1, 10) * ip["scan_amp_px"]
    ip["_sine_freq"] = r.uniform(5, 60, 10)
    ip["_sine_phase"] = r.uniform(0, 2 * np.pi, 10)
    ip["_sine_is_x"] = r.random(10) < 0.7
    ip["drift_px"] = r.uniform(0, 2.0)
    ip["_drift_angle"] = r.uniform(0, 2 * np.pi)
    ip["jitter_px"] = 0.3
    ip["charging"] = bool(r.random() < 0.25)
    ip["charging_streak_px"] = r.uniform(5, 40)
    ip["charging_amp"] = r.uniform(0.02, 0.1)
    ip["charging_ramp"] = r.uniform(0.03, 0.1) * (1 if r.random() < 0.5 else -1)
    ip["_ramp_angle"] = r.uniform(0, 2 * np.pi)
    ip["_halo_amp"] = r.uniform(0.03, 0.1)
    ip["_halo_sigma_px"] = r.uniform(3, 8)
    ip["detector_sigma"] = r.uniform(0.005, 0.03)
    ip["row_offset_sigma"] = r.uniform(0, 0.01)
    ip["row_gain_sigma"] = 0.01
    gamma_noise = bool(r.random() < 0.3)
    ip["noise_model"] = "gamma" if gamma_noise else "poisson"
    # shot noise: redraw (n, F, k) until the nominal top/bottom contrast-to-noise ratio lies in the
    # recipe's sanity range (depends on imaging parameters only, never on the class)
    dy = ip["c_top"] - ip["c_bot"]
    ym = 0.5 * (ip["c_top"] + ip["c_bot"])
    for _ in range(100):
        n = r.uniform(3, 15)
        F = int(_FRAMES[int(r.integers(len(_FRAMES)))])
        k = r.uniform(2, 8)
        shot = ym / math.sqrt(k * F) if gamma_noise else math.sqrt(ym / (n * F))
        snr = dy / math.sqrt(shot**2 + ip["detector_sigma"] ** 2)
        if _SNR_RANGE[0] <= snr <= _SNR_RANGE[1]:
            break
    ip["electrons_per_px"], ip["frames"], ip["snr_nominal"] = n, F, snr
    if gamma_noise:
        ip["gamma_shape_k"] = k
    ip["black_level"] = r.uniform(5, 30)
    ip["white_level"] = r.uniform(200, 250)
    ip["_sat_lo"], ip["_sat_hi"] = r.uniform(0, 0.0015, 2)
    use_gamma = bool(r.random() < 0.5)
    g = r.uniform(0.8, 1.2)
    ip["gamma"] = g if use_gamma else 1.0
    return ip


def _half(a: np.ndarray) -> np.ndarray:
    """Area-average 2x2 blocks (fine grid -> output grid)."""
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * _F32(0.25)


def _se_yield(sc: _Scene, ip: dict) -> np.ndarray:
    """Secondary-electron yield at fine resolution, edge effect from a distance transform in nm.

    Levels: 2 = top (raised material), 1 = bottom, 0 = groove (scratch/crack/pit below the
    bottom). Pixels on the upper side of a step get c + a*exp(-d_in/lambda) (bright edge), pixels
    on the lower side c_bot + 0.3*a*exp(-d_out/(0.7*lambda)); d is measured from the nearest
    upper-side edge pixel, found with one Euclidean distance (feature) transform.
    """
    cv = sc.cv
    p2, a, lam = cv.p2, ip["edge_amp"], ip["edge_lambda_nm"]
    ct, cb = ip["c_top"], ip["c_bot"]
    h = sc.h
    T = h > 0.25
    G = sc.groove if sc.groove is not None and sc.groove.any() else None
    if G is not None:
        T &= ~G
        lev = T.astype(np.int8) + 1
        lev[G] = 0
        up = np.zeros_like(T)
        up[1:] |= lev[1:] > lev[:-1]
        up[:-1] |= lev[:-1] > lev[1:]
        up[:, 1:] |= lev[:, 1:] > lev[:, :-1]
        up[:, :-1] |= lev[:, :-1] > lev[:, 1:]
    else:
        up = _inner_boundary(T)
    if not up.any():
        d = np.full(h.shape, 1e4, _F32)
        same = T
    elif G is None:
        d = ndi.distance_transform_edt(~up).astype(_F32)
        same = T  # the only upper-side edges are those of the top level
    else:
        d, (iy, ix) = ndi.distance_transform_edt(~up, return_indices=True)
        d = d.astype(_F32)
        same = lev.ravel()[iy.ravel() * lev.shape[1] + ix.ravel()].reshape(lev.shape) == lev
    e_up = np.exp(-(d + _F32(0.5)) * _F32(p2 / lam))
    e_lo = np.exp(-np.maximum(d - _F32(0.5), 0) * _F32(p2 / (0.7 * lam)))
    ctop = ct if sc.mat is None else ct + sc.mat
    Y = np.where(T, cb + h * (ctop - cb + a * e_up), cb + _F32(0.3 * a) * e_lo).astype(_F32)
    if G is not None:
        Y[G] -= _F32(cb * (1 - sc.groove_dark))
        lip = same & ~T & ~G  # bottom pixels on the upper side of a groove edge
        Y[lip] += _F32(0.7 * a) * e_up[lip] - _F32(0.3 * a) * e_lo[lip]
    if sc.pmask is not None:
        Y = np.where(sc.pmask, ct * sc.pY + a * e_up, Y)
    if sc.mult is not None:
        Y *= sc.mult
    return Y


def _blur(img: np.ndarray, sigma_px: float, ratio: float, angle: float) -> np.ndarray:
    pad = _MARGIN
    x = np.pad(img, pad, mode="reflect")
    fy = np.fft.fftfreq(x.shape[0]).astype(_F32)[:, None]
    fx = np.fft.rfftfreq(x.shape[1]).astype(_F32)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    fu, fv = fx * c + fy * s, -fx * s + fy * c
    H = np.exp(-2 * np.pi**2 * ((sigma_px * ratio) ** 2 * fu * fu + sigma_px**2 * fv * fv))
    out = _sfft.irfft2(_sfft.rfft2(x) * H, s=x.shape)
    return out[pad:-pad, pad:-pad].astype(_F32)


def _form_image(sc: _Scene, ip: dict, rn) -> np.ndarray:
    cv = sc.cv
    n1, size, M, p = cv.n1, cv.size, _MARGIN, cv.p
    # 1. SE yield at 2x, area-averaged down; surface texture
    Y = _half(_se_yield(sc, ip))
    noise = rn.standard_normal((n1, n1), dtype=_F32)
    tsig = max(ip["texture_sigma_nm"] / p, 0.5)
    tex = _sfft.irfft2(ndi.fourier_gaussian(_sfft.rfft2(noise), tsig, n=n1), s=(n1, n1))
    tex /= max(float(tex.std()), 1e-6)
    Y *= 1 + _F32(ip["texture_amp"]) * tex
    # 2. slowly varying background (bicubic upsampling of a 5x5 grid)
    W = _bicubic_matrix(n1)
    Y += _F32(ip["background_amp"]) * _upsample(ip["_bg_grid"].astype(_F32), W)
    # 3. beam blur: anisotropic Gaussian PSF
    Y = _blur(Y, ip["beam_sigma_nm"] / p, ip["astigmatism"], math.radians(ip["astig_angle_deg"]))
    # 4. scan distortion (sines of raster time, drift, per-row jitter), bilinear, crop the margin
    rows = np.arange(M, M + size, dtype=np.float64)
    cols = np.arange(M, M + size, dtype=np.float64)
    ns = ip["scan_n_sines"]
    amp, fr, ph, isx = (ip[k][:ns] for k in ("_sine_amp", "_sine_freq", "_sine_phase", "_sine_is_x"))
    # sin(2 pi f (r*n1 + c)/n1^2 + phi) = Im(e^{i phi} e^{i 2 pi f r/n1} e^{i 2 pi f c/n1^2})
    A = amp * np.exp(1j * ph) * np.exp(2j * np.pi * np.outer(rows, fr) / n1)
    Bc = np.exp(2j * np.pi * np.outer(fr, cols) / n1**2)
    dx = _mm(A[:, isx], Bc[isx]).imag
    dy = _mm(A[:, ~isx], Bc[~isx]).imag
    t = (rows[:, None] * n1 + cols[None, :]) / n1**2
    da = ip["_drift_angle"]
    dx += ip["drift_px"] * math.cos(da) * t + rn.normal(0, ip["jitter_px"], size)[:, None]
    dy += ip["drift_px"] * math.sin(da) * t
    coords = np.stack([np.broadcast_to(rows[:, None], (size, size)) + dy,
                       np.broadcast_to(cols[None, :], (size, size)) + dx])
    Y = ndi.map_coordinates(Y, coords, order=1, mode="nearest").astype(_F32)
    # 5. charging: streaks trailing bright pixels along the fast axis, ramp, halos round particles
    if ip["charging"]:
        hi_q = float(np.quantile(Y, 0.9))
        top = float(Y.max())
        bright = np.clip((Y - hi_q) / max(top - hi_q, 1e-6), 0, 1)
        L = ip["charging_streak_px"]
        K = int(3 * L)
        w = np.zeros(2 * K + 1, _F32)
        w[:K] = np.exp(-np.arange(K, 0, -1) / L)  # offsets -K..-1: pixels scanned earlier
        s = ndi.correlate1d(bright, w, axis=1, mode="constant")
        Y += _F32(ip["charging_amp"]) * (1 - np.exp(-s / 2))
        ra = ip["_ramp_angle"]
        g = np.linspace(-1, 1, size, dtype=_F32)
        Y *= 1 + _F32(ip["charging_ramp"]) * (g[None, :] * math.cos(ra) + g[:, None] * math.sin(ra)) / _F32(1.42)
        if sc.pmask is not None:
            pm = _half(sc.pmask.astype(_F32))[M:M + size, M:M + size]
            Y += _F32(ip["_halo_amp"]) * ndi.gaussian_filter(pm, ip["_halo_sigma_px"] * cv.s) * (1 - pm)
    # 6. shot noise with frame averaging
    Y = np.maximum(Y, _F32(1e-3))
    F = ip["frames"]
    if ip["noise_model"] == "gamma":
        kf = ip["gamma_shape_k"] * F
        img = rn.gamma(kf, Y / kf).astype(_F32)
    else:
        nf = ip["electrons_per_px"] * F
        img = (rn.poisson(Y * nf) / nf).astype(_F32)
    # 7. detector: Gaussian noise, per-row offset and gain
    gain = 1 + rn.normal(0, ip["row_gain_sigma"], size).astype(_F32)
    off = rn.normal(0, ip["row_offset_sigma"], size).astype(_F32)
    img = img * gain[:, None] + off[:, None]
    img += rn.normal(0, ip["detector_sigma"], (size, size)).astype(_F32)
    # 8. output: linear contrast (<= ~0.3 % saturated), black/white levels, optional gamma
    lo, hi = np.quantile(img, [ip["_sat_lo"], 1 - ip["_sat_hi"]])
    x = np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1)
    if ip["gamma"] != 1.0:
        x = x ** _F32(ip["gamma"])
    out = ip["black_level"] + (ip["white_level"] - ip["black_level"]) * x
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
def _slug(cls: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", cls.lower()).strip("_")


class _NoBar:
    def update(self, n=1):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # lazy; console bar (tqdm.auto would warn in kernels without ipywidgets)

    return tqdm(total=total, desc="render", unit="img")


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
