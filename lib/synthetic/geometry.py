"""Synthetic SEM, the geometry: seeds, the nanometre canvas, line/space and contact-array layouts.

Patterns are drawn in nm on a canvas rendered at twice the output resolution and area-averaged
down (no aliased edges), with a margin cropped after the scan-distortion step. Line edges carry
line-edge roughness synthesised by the Mack-Thorsos method from the Palasantzas power spectral
density PSD(f) = 2σ²ξ / (1 + (2πfξ)²)^(α + 1/2) (σ the 1σ roughness, ξ the correlation length,
α the roughness exponent), rescaled to exactly σ; contact holes carry harmonic edge roughness.
Every image's randomness derives from one seed, a pure function of (global seed, class, index).
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
from scipy import ndimage as ndi



CLASSES: tuple[str, ...] = ("bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias")


LAYOUTS: tuple[str, ...] = ("line_space", "contact_array", "planar")


_F32 = np.float32


_MARGIN = 16  # px rendered around the final image, cropped after the scan-distortion step


_REF_SIZE = 224  # pixel quantities in the recipe (defect sizes, widths) refer to a 224 px image


_MAX_TRIES = 30


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
