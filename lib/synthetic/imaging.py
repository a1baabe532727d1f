"""Synthetic SEM, the imaging chain: what the microscope does to the height map.

In order: secondary-electron yield from distance transforms to the edges (the bright-edge
effect, I = c + a·exp(-d/λ) on top surfaces, as NIST's ARTIMAGEN models it) with surface
texture; a slowly varying background; beam blur (an astigmatic Gaussian PSF); scan distortion
(raster sines, drift, per-row jitter); charging in some images (bright streaks along the fast
scan axis, a brightness ramp); shot noise with frame averaging, detector noise and the output
contrast. Imaging parameters come from a stream that never depends on the class, so brightness
and noise give no class away.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as _sfft
from scipy import ndimage as ndi

from lib.synthetic.geometry import _F32, _MARGIN, _Scene, _bicubic_matrix, _inner_boundary, _mm, _upsample


_FRAMES = (1, 2, 4, 8, 16, 32)


_SNR_RANGE = (1.5, 15.0)


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
    return _record(_signal(sc, ip, rn), ip, rn)


def noise_sigma(ip: dict) -> float:
    """The per-pixel noise std (shot and detector, 0-1 signal scale) at the mean of the top and bottom
    levels: the denominator of the contrast-to-noise ratios below."""
    ym = 0.5 * (ip["c_top"] + ip["c_bot"])
    F = ip["frames"]
    shot = ym / math.sqrt(ip["gamma_shape_k"] * F) if ip["noise_model"] == "gamma" else math.sqrt(
        ym / (ip["electrons_per_px"] * F))
    return math.sqrt(shot**2 + ip["detector_sigma"] ** 2)


def visibility(with_defect: np.ndarray, without: np.ndarray, ip: dict, stain: bool = False) -> dict:
    """How visible a defect is: the contrast-to-noise ratio of the defect's own mask.

    The noise-free signal with and without the defect (same layout, texture and scan) differ where
    the defect is; its mask is where the difference reaches half its peak (the 99.9th percentile),
    so a global side effect (a brightness shift, an edge redrawn) does not dilute it. The CNR is
    the mean absolute difference over the mask divided by the image's noise std. Judged by eye on
    rendered images: below about 1 a crack or a bridge cannot be told from the noise, from about
    1.5 every defect class is plain to see. (The Rose criterion, which integrates the CNR over the
    whole area, calls even those invisible cracks visible: thin defects are not seen that way.)

    A stain (`stain=True`: the image's only defects are residues) multiplies the brightness under
    it, so its largest differences sit on the brightest pattern edges and the CNR above rates it
    by them. The eye sees a stain as a patch brighter or darker than its surroundings instead:
    it is also held to `stain_contrast`, and its visibility is the smaller of the two."""
    d = np.abs(with_defect - without)
    peak = float(np.quantile(d, 0.999))
    mask = d >= 0.5 * peak if peak > 0.02 * (ip["c_top"] - ip["c_bot"]) else np.zeros(d.shape, bool)
    area = int(mask.sum())
    cnr = float(d[mask].mean()) / noise_sigma(ip) if area else 0.0
    if stain and area:
        cnr = min(cnr, stain_contrast(with_defect, without))
    return {"visibility": cnr, "defect_area_px": area}


def stain_contrast(with_defect: np.ndarray, without: np.ndarray) -> float:
    """A stain's contrast at its own scale: the mean brightness change over the stain (where the
    relative change reaches half its peak) over the spread of the stain-free signal smoothed at
    the stain's scale (a Gaussian of half its equivalent radius), the pattern, background and
    charging variation the stain has to stand out from. Judged by eye on rendered images: below
    about 1.5 a stain cannot be found, from about 2 it is plain to see; the CNR of the same
    stains ranges from 1.2 to 2.9 over those, so it cannot tell them apart."""
    d = with_defect - without
    rel = np.abs(d) / np.maximum(without, 1e-3)
    region = rel >= 0.5 * float(np.quantile(rel, 0.999))
    radius = math.sqrt(float(region.sum()) / math.pi)
    clutter = float(ndi.gaussian_filter(without, max(radius / 2, 1.0)).std())
    return abs(float(d[region].mean())) / max(clutter, 1e-6)


def _signal(sc: _Scene, ip: dict, rn) -> np.ndarray:
    """The noise-free image (steps 1-5): yield, texture, background, blur, scan distortion, charging."""
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
    return Y


def _record(Y: np.ndarray, ip: dict, rn) -> np.ndarray:
    """What the detector records of a noise-free image (steps 6-8): shot and detector noise, the
    output contrast, as 8-bit grayscale."""
    size = Y.shape[0]
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
