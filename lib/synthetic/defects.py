"""Synthetic SEM, the defects: the geometry of each defect class on a scene.

- bridge: material joining two neighbouring lines (full height, or a dim micro-bridge);
- open: a gap in a line with rough ends, or a pinch narrowing it;
- CMP(scratch): long, nearly straight arcs with chatter, fainter parallel scratches and debris;
- cracks: a branching random walk with bright lips (secondary-electron edge effect);
- others: particles with a bright rim and shadow, residue stains, collapsed or missing pattern,
  pinholes;
- vias: holes of a contact array missing, merged, misshaped, undersized or oversized.
"""

from __future__ import annotations

import math
import re

import numpy as np
from scipy import ndimage as ndi

from lib.synthetic.geometry import _F32, _Holes, _Lines, _Scene, _densify, _harm_eval, _lowharm, _polar, _stamp, _table_fun


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
