"""Anatomy as implicit functions of world RAS mm, rasterised on any grid (`_render`): torso,
lungs with vessel/airway trees, heart, vessels, abdominal organs, spine, ribs, mattress and couch."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from scipy import ndimage

from medct.phantom.spec import _LESION_TISSUE, _T, LABEL_IDS, Ellipsoid, PhantomParams, _rng, _rotation, _vec3


def _world(affine: np.ndarray, pos: list[np.ndarray]) -> list[np.ndarray]:
    """World coordinates (3 arrays, float32) of the voxel positions pos[0] x pos[1] x pos[2]."""
    i = pos[0].astype(np.float32)[:, None, None]
    j = pos[1].astype(np.float32)[None, :, None]
    k = pos[2].astype(np.float32)[None, None, :]
    out = []
    for r in range(3):
        m = affine[r].astype(np.float32)
        out.append(
            np.ascontiguousarray(
                np.broadcast_to(m[0] * i + m[1] * j + (m[2] * k + m[3]), (len(pos[0]), len(pos[1]), len(pos[2])))
            )
        )
    return out


def _lerp_axis(a: np.ndarray, n: int, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along `axis` from samples at `positions` (sorted voxel indices) to 0..n-1."""
    x = np.arange(n, dtype=np.float64)
    if len(positions) == 1:
        return np.repeat(a, n, axis=axis)
    hi = np.clip(np.searchsorted(positions, x, side="right"), 1, len(positions) - 1)
    lo = hi - 1
    w = np.clip((x - positions[lo]) / (positions[hi] - positions[lo]), 0.0, 1.0).astype(np.float32)
    shp = [1] * a.ndim
    shp[axis] = n
    out = np.take(a, lo, axis=axis)
    out += (np.take(a, hi, axis=axis) - out) * w.reshape(shp)
    return out


def _upsample(coarse: np.ndarray, positions: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear upsampling (C, m0, m1, m2) -> (C, n0, n1, n2).

    Hand-written because scipy.ndimage.zoom has no batch dimension and cannot take the exact sample
    positions; a gather + lerp per axis also avoids BLAS threads, which stall on busy machines."""
    out = coarse
    for ax in (2, 1, 0):
        out = _lerp_axis(out, shape[ax], positions[ax], ax + 1)
    return out


class _Lattice:
    """Smooth random field(s) on a fixed world lattice (independent of the image grid), sampled
    trilinearly at world points: the same patient looks the same on every grid."""

    ORIGIN = -264.0
    EXTENT = 528.0

    def __init__(self, rng: np.random.Generator, channels: int, step: float, sigma: float, peak: float | None) -> None:
        n = int(self.EXTENT / step) + 1
        v = rng.standard_normal((channels, n, n, n)).astype(np.float32)
        for c in range(channels):
            v[c] = ndimage.gaussian_filter(v[c], sigma, mode="wrap")
            # unit std, or a fixed peak amplitude (deformations): trilinear sampling keeps the bound
            v[c] *= (peak / np.abs(v[c]).max()) if peak is not None else (1.0 / v[c].std())
        self.values, self.step = v, step

    def sample(self, pts: list[np.ndarray]) -> np.ndarray:
        """(C, *pts[0].shape) field values at world points pts = [x, y, z]."""
        idx = np.stack([((p - self.ORIGIN) / self.step).ravel() for p in pts])  # (3, N)
        out = [ndimage.map_coordinates(ch, idx, order=1, mode="nearest") for ch in self.values]
        return np.stack(out).reshape((len(out), *pts[0].shape))


@functools.lru_cache(maxsize=16)
def _lattice(seed: int, stream: int, channels: int, step: float, sigma: float, peak: float | None) -> _Lattice:
    # cached: the phases of a breathing series and repeated renders of a patient share their fields
    return _Lattice(_rng(seed, stream), channels, step, sigma, peak)


# ----------------------------------------------------------------------------- anatomy helpers


def _torso(p: PhantomParams, x, y, z):
    """Torso cross-section at world points: (s, depth, fat) with s the normalised radius (<= 1 inside
    the skin), depth the distance (mm) inwards from the skin along the ray from the body axis, and fat
    the local subcutaneous fat thickness (thinner on the back). The outline is an ellipse with a
    flatter back and a slight barrel shape along z. Works on arrays and on scalars."""
    a = p.body_half_width * (1.0 - 0.05 * ((z + 20.0) / 200.0) ** 2)
    ant = y > 0
    y2 = y * y
    yb2 = y2 * np.where(ant, 1.0 / p.body_anterior**2, 1.0 / p.body_posterior**2)
    x2 = x * x
    s = np.sqrt(x2 / (a * a) + np.where(ant, yb2, yb2 * (0.55 + 0.45 * yb2)))
    r = np.sqrt(x2 + y2)
    depth = r / np.maximum(s, 1e-3) - r
    fat = p.fat_mm * (0.775 + 0.225 * np.clip(y * (1.0 / 40.0), -1.0, 1.0))
    return s, depth, fat


def _diaphragm_z(p: PhantomParams, x, y):
    """Height (mm) of the diaphragm surface above (x, y): two paraboloid domes."""
    k = 1.0 / (2.0 * p.dome_radius)
    zr = p.dome_right[2] - k * ((x - p.dome_right[0]) ** 2 + 0.8 * (y - p.dome_right[1]) ** 2)
    zl = p.dome_left[2] - k * ((x - p.dome_left[0]) ** 2 + 0.8 * (y - p.dome_left[1]) ** 2)
    return np.maximum(zr, zl)


def _ell_rho2(q: list[np.ndarray], e: Ellipsoid) -> np.ndarray:
    """Normalised squared radius of points q in ellipsoid e (<= 1: inside)."""
    r = _rotation(e.angles_deg)
    d = [q[i] - np.float32(e.center[i]) for i in range(3)]
    out = None
    for ax in range(3):
        loc = (d[0] * np.float32(r[0, ax]) + d[1] * np.float32(r[1, ax]) + d[2] * np.float32(r[2, ax])) * np.float32(
            1.0 / e.radii[ax]
        )
        out = loc * loc if out is None else out + loc * loc
    return out  # type: ignore[return-value]


def _ell_bbox(e: Ellipsoid, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    r = _rotation(e.angles_deg)
    half = np.sqrt(((r * (np.asarray(e.radii) * scale)[None, :]) ** 2).sum(axis=1))
    return np.asarray(e.center) - half, np.asarray(e.center) + half


def _trees(
    rng: np.random.Generator, root, directions, length: float, radius: float, depth: int, spread_deg: float
) -> np.ndarray:
    """Random binary vessel trees, one per direction, grown level by level (vectorised).

    Returns (N, 8) segments (ax, ay, az, bx, by, bz, r_a, r_b); children turn by ~spread_deg and are
    shorter (x0.65-0.85) and thinner (x0.72) than their parent (Murray-like tapering)."""
    d = np.asarray(directions, float)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p = np.broadcast_to(np.asarray(root, float), d.shape).copy()
    ln = np.full(len(d), float(length))
    r = float(radius)
    out = []
    for level in range(depth + 1):
        q = p + d * ln[:, None]
        out.append(np.column_stack([p, q, np.full(len(d), r), np.full(len(d), 0.82 * r)]))
        if level == depth:
            break
        nd = np.repeat(d, 2, axis=0) + math.radians(spread_deg) * rng.normal(size=(2 * len(d), 3))
        d = nd / np.linalg.norm(nd, axis=1, keepdims=True)
        p = np.repeat(q, 2, axis=0)
        ln = np.repeat(ln, 2) * rng.uniform(0.65, 0.85, size=2 * len(ln))
        r *= 0.72
    return np.concatenate(out)


def _polyline(points: list[tuple[float, float, float]], radius: float) -> list[tuple]:
    return [(*a, *b, radius, radius) for a, b in itertools.pairwise(points)]


# ----------------------------------------------------------------------------- rendering


# main pulmonary vessel directions from the hilum (x mirrored per side), spread over all lobes
_LUNG_TRUNKS = (
    (0.2, 0.0, 1.0),
    (0.8, 0.2, 0.6),
    (1.0, 0.1, -0.1),
    (0.4, 1.0, 0.1),
    (0.4, -1.0, 0.2),
    (0.6, 0.0, -1.0),
    (0.3, 0.8, -0.8),
    (0.3, -0.8, -0.9),
    (0.9, 0.6, -0.4),
    (0.9, -0.6, -0.4),
    (0.6, 0.5, 0.8),
    (0.6, -0.6, 0.7),
)
_CUBE = np.array(list(itertools.product((0.0, 1.0), repeat=3)))  # (8, 3) unit-cube corners


class _Canvas:
    """Tissue and label maps being painted, plus the two coordinate sets: `qs` for structures fixed to
    the skeleton/body wall, `qi` for the internal organs that breathing moves."""

    def __init__(
        self,
        p: PhantomParams,
        affine: np.ndarray,
        shape: tuple[int, int, int],
        qs: list[np.ndarray],
        qi: list[np.ndarray],
        deform: _Lattice,
        shift_mm: float,
    ) -> None:
        margin_s, margin_i = p.deform_mm + 1.0, p.deform_mm + abs(shift_mm) + 1.0
        self.params, self.deform, self.shift_mm = p, deform, shift_mm
        self.spacing = np.linalg.norm(affine[:3, :3], axis=0)
        self.shape, self.affine, self.inv = shape, affine, np.linalg.inv(affine)
        self.qs, self.qi, self.margin_s, self.margin_i = qs, qi, margin_s, margin_i
        self.tissue = np.zeros(shape, np.uint8)  # (X, Y, Z) all air
        self.label = np.zeros(shape, np.uint8)
        self.moving = np.zeros(shape, bool)  # voxels whose content moves with breathing
        # torso: normalised radius, depth below the skin and local fat thickness (mm), static coordinates
        self.s_out, self.depth, self.fat = _torso(p, qs[0], qs[1], qs[2])  # (X, Y, Z) each

    def block(self, lo, hi, internal: bool) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
        """Index sub-block holding the world box [lo, hi] (+ deformation margin) and its coordinates."""
        m = self.margin_i if internal else self.margin_s
        lo = np.asarray(lo, float) - m
        corners = lo + _CUBE * (np.asarray(hi, float) + m - lo)  # (8, 3)
        idx = corners @ self.inv[:3, :3].T + self.inv[:3, 3]
        a = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, self.shape)
        b = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, self.shape)
        if np.any(a >= b):
            return None
        sl = tuple(slice(int(u), int(v)) for u, v in zip(a, b, strict=True))
        q = self.qi if internal else self.qs
        return sl, [c[sl] for c in q]

    def paint(self, sl, mask: np.ndarray, tissue: str, label: int | None, static: bool = False) -> None:
        np.copyto(self.tissue[sl], _T[tissue], where=mask)  # faster than boolean setitem
        if label is not None:
            np.copyto(self.label[sl], label, where=mask)
        if static:
            np.copyto(self.moving[sl], False, where=mask)

    def to_grid(self, pts: np.ndarray) -> np.ndarray:
        """Approximate inverse of the internal coordinate map: world positions (M, 3) on the grid of
        anatomy points `pts` (M, 3). First order in the smooth deformation (error << 1 mm)."""
        u = self.deform.sample([pts[:, 0], pts[:, 1], pts[:, 2]]).T  # (M, 3)
        w = pts - u
        if self.shift_mm != 0.0:
            z = w[:, 2].copy()
            for _ in range(3):  # fixed point of z + shift(x, y, z) = target
                z = w[:, 2] - _breathing_shift(self.params, w[:, 0], w[:, 1], z, self.shift_mm)
            w[:, 2] = z
        return w

    def thin_tubes(self, segs: np.ndarray, tissue: str, within: int) -> None:
        """Paint many thin tapered tubes inside voxels labelled `within` (label unchanged) by splatting
        spheres along each segment: one vectorised pass instead of one block per segment."""
        if len(segs) == 0:
            return
        sp = self.spacing
        a, b, ra, rb = segs[:, :3], segs[:, 3:6], segs[:, 6], segs[:, 7]
        seg_len = np.linalg.norm(b - a, axis=1)
        step = np.minimum(np.minimum(ra, rb), 0.5 * sp.min())  # sphere spacing <= radius: ripple < 15 %
        n = np.ceil(seg_len / step).astype(int) + 1
        sid = np.repeat(np.arange(len(segs)), n)
        t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
        pts = a[sid] + (b - a)[sid] * t[:, None]  # (M, 3) anatomy mm
        rad = ra[sid] + (rb - ra)[sid] * t
        ijk = self.to_grid(pts) @ self.inv[:3, :3].T + self.inv[:3, 3]  # (M, 3) fractional voxel index
        base = np.rint(ijk).astype(np.int64)
        frac = (ijk - base) * sp  # mm offset of the point from its nearest voxel centre, per axis
        flat: list[np.ndarray] = []
        half = np.ceil(rad / sp.min()).astype(int)
        for h in np.unique(half):  # group by stencil size
            off = np.stack(np.meshgrid(*[np.arange(-h, h + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (S, 3)
            group = np.flatnonzero(half == h)
            for start in range(0, len(group), max(1, 2_000_000 // len(off))):  # bound the (G, S) temporaries
                g = group[start : start + max(1, 2_000_000 // len(off))]
                d2 = (((off[None, :, :] * sp) - frac[g][:, None, :]) ** 2).sum(-1)  # (G, S) mm^2, orthogonal axes
                hit = d2 <= (rad[g] ** 2)[:, None]
                vox = (base[g][:, None, :] + off[None, :, :])[hit]  # (H, 3)
                ok = np.all((vox >= 0) & (vox < np.asarray(self.shape)), axis=1)
                flat.append(np.ravel_multi_index(vox[ok].T, self.shape))
        idx = np.unique(np.concatenate(flat))
        idx = idx[self.label.ravel()[idx] == within]
        self.tissue.ravel()[idx] = _T[tissue]

    def tubes(
        self,
        segs: list[tuple],
        tissue: str,
        label: int | None,
        internal: bool,
        within: int | None = None,
        static: bool = False,
    ) -> None:
        """Paint tapered tubes; `within` restricts them to voxels currently carrying that label."""
        for s in segs:
            a, b = np.array(s[:3]), np.array(s[3:6])
            r = max(s[6], s[7])
            blk = self.block(np.minimum(a, b) - r, np.maximum(a, b) + r, internal)
            if blk is None:
                continue
            sl, q = blk
            ab = b - a
            inv_len2 = 1.0 / max(float(ab @ ab), 1e-9)
            d = [q[i] - np.float32(a[i]) for i in range(3)]
            t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) * np.float32(inv_len2), 0.0, 1.0)
            dist2 = sum((d[i] - t * np.float32(ab[i])) ** 2 for i in range(3))
            rad = np.float32(s[6]) + t * np.float32(s[7] - s[6])
            mask = dist2 <= rad * rad
            if within is not None:
                mask &= self.label[sl] == within
            self.paint(sl, mask, tissue, label, static)


def _breathing_shift(p: PhantomParams, x, y, z, shift_mm: float):
    """Pull-back z displacement: content at (x, y, z) in a phase whose diaphragm is `shift_mm` lower
    came from (x, y, z + shift). Full shift below the diaphragm (abdominal organs translate), decaying
    exponentially upwards through the lung (length 70 mm > any shift, so the map stays invertible)."""
    s = z - _diaphragm_z(p, x, y)
    return np.float32(shift_mm) * np.exp(np.minimum(-s / 70.0, 0.0)).astype(np.float32)


def _render(p: PhantomParams, affine: np.ndarray, shape: tuple[int, int, int], shift_mm: float, need_bias: bool):
    """Paint one patient on a grid. Returns the canvas (tissue, label and moving masks), the texture field,
    the MR bias field (or None), extra HU (lung density gradient) and the pull-back z shift (or None),
    all (X, Y, Z). shift_mm > 0 lowers the diaphragm (inspiration)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    full = [np.arange(n, dtype=np.float64) for n in shape]
    w = _world(affine, full)  # 3 x (X, Y, Z) world mm
    # Smooth fields are computed on a coarse copy of the grid (~12 mm) and upsampled.
    steps = [max(1, int(round(12.0 / s))) for s in spacing]
    cpos = [np.unique(np.r_[np.arange(0, n, st), n - 1]).astype(np.float64) for n, st in zip(shape, steps, strict=True)]
    wc = _world(affine, cpos)  # 3 x coarse
    deform = _lattice(p.seed, 3, 3, 24.0, 2.0, p.deform_mm)
    fields = _lattice(p.seed, 4, 3, 10.0, 1.3, None)  # texture, bowel, gas
    chans = [deform.sample(wc)]  # (3, m0, m1, m2) static deformation
    vz = None
    if shift_mm != 0.0:
        vz = _breathing_shift(p, w[0], w[1], w[2], shift_mm)
        pc = [wc[0], wc[1], wc[2] + _breathing_shift(p, wc[0], wc[1], wc[2], shift_mm)]
        chans += [deform.sample(pc), fields.sample(pc)]
    else:
        chans += [fields.sample(wc)]
    if need_bias:
        chans.append(_lattice(p.seed, 6, 1, 40.0, 2.0, None).sample(wc))  # MR bias field, ~200 mm wavelength
    up = _upsample(np.concatenate(chans), cpos, shape)  # (C, X, Y, Z)
    qs = [w[i] + up[i] for i in range(3)]
    if vz is not None:
        qi = [w[0] + up[3], w[1] + up[4], w[2] + vz + up[5]]
        tex, bowel, gas = up[6], up[7], up[8]
    else:
        qi = qs
        tex, bowel, gas = up[3], up[4], up[5]
    bias = up[-1] if need_bias else None
    cv = _Canvas(p, affine, shape, qs, qi, deform, shift_mm)
    rng = _rng(p.seed, 5)
    extra = np.zeros(shape, np.float32)

    # --- couch under the back, arms beside the trunk, body wall: static
    _mattress(cv, p)
    if p.arms == "down":
        _arms(cv, p)
    x, y, z = qs
    s_out, depth, fat = cv.s_out, cv.depth, cv.fat
    cv.paint(np.s_[:], depth >= 0.0, "fat", 0)
    wall = depth >= fat
    cv.paint(np.s_[:], wall, "muscle", 0)
    cavity = depth >= fat + np.float32(p.muscle_mm)
    cv.paint(np.s_[:], cavity, "fat", 0)
    cv.moving |= cavity

    # --- thorax / abdomen split by the (moving) diaphragm
    xi, yi, zi = qi
    zd = _diaphragm_z(p, xi, yi)
    thorax = cavity & (zi > zd)
    abdomen = cavity & (zi < zd - 5.0)
    cv.paint(np.s_[:], cavity & ~thorax & ~abdomen, "muscle", 0)  # diaphragm muscle sheet
    # lungs: thoracic cavity minus the mediastinum, narrowing towards the apices (rib cage: static)
    za = np.maximum(z - np.float32(80.0), 0.0) * np.float32(1.0 / 130.0)
    lung = thorax & (np.abs(xi + 8.0) > 24.0) & (s_out <= 1.0 - 0.5 * za * za)
    cv.paint(np.s_[:], lung & (xi < 0), "lung", LABEL_IDS["lung_left"])
    cv.paint(np.s_[:], lung & (xi >= 0), "lung", LABEL_IDS["lung_right"])
    # dependent (posterior) lung is denser: +35 HU per 100 mm; parenchyma density varies by patient
    extra[lung] = -0.35 * yi[lung] + np.float32(p.lung_density_hu)
    # bowel loops and gas in the abdominal cavity below the upper-abdominal organs
    lower = abdomen & (zi < p.dome_right[2] - 60.0 + 0.25 * yi)
    bow = lower & (bowel > 0.1)
    cv.paint(np.s_[:], bow, "bowel", 0)
    cv.paint(np.s_[:], bow & (gas > 1.6), "air", 0)

    # --- mediastinum: heart, airways, oesophagus
    h = p.heart
    blk = cv.block(*_ell_bbox(h), True)
    if blk is not None:
        sl, q = blk
        r2 = _ell_rho2(q, h)
        inside = (r2 <= 1.0) & cavity[sl] & (zi[sl] > zd[sl] - 5.0)
        cv.paint(sl, inside, "myocardium", 0)
        hx = q[0] - np.float32(h.center[0])
        cv.paint(sl, inside & (r2 < 0.55) & (hx < 0), "blood_arterial", 0)  # left ventricle / atrium
        cv.paint(sl, inside & (r2 < 0.55) & (hx >= 0), "blood_venous", 0)  # right heart
    carina = (0.0, 2.0, h.center[2] + 45.0)
    cv.tubes(_polyline([(0.0, 4.0, 260.0), carina], 9.0), "air", 0, True)
    hilum = {s: (s * 48.0, -8.0, h.center[2] + 25.0) for s in (-1.0, 1.0)}
    for s in (-1.0, 1.0):
        cv.tubes([(*carina, *hilum[s], 6.5, 5.5)], "air", None, True)
        dirs = [(0.3 * s, 0.1, 1.0), (s, 0.0, -0.4), (0.4 * s, 0.9, -0.3), (0.5 * s, -0.8, -0.8)]
        cv.thin_tubes(
            _trees(rng, hilum[s], dirs, 30.0, 4.5, 3, 25.0), "air", LABEL_IDS["lung_left" if s < 0 else "lung_right"]
        )
    esophagus = [
        (-6.0, p.spine_y + 28.0, 260.0),
        (-8.0, p.spine_y + 30.0, h.center[2] - 30.0),
        (p.stomach.center[0] + 15.0, p.stomach.center[1] - 15.0, p.stomach.center[2] + 45.0),
    ]
    cv.tubes(_polyline(esophagus, 7.0), "muscle", 0, True, within=0)
    # pulmonary vessel trees from each hilum, kept inside the lung
    for s in (-1.0, 1.0):
        dirs = [(d[0] * s, d[1], d[2]) for d in _LUNG_TRUNKS]
        vessels = _trees(rng, (hilum[s][0], hilum[s][1] + 6.0, hilum[s][2]), dirs, 32.0, 5.0, 5, 30.0)
        cv.thin_tubes(vessels, "lung_vessel", LABEL_IDS["lung_left" if s < 0 else "lung_right"])

    # --- liver (two lobes under the right dome) with gallbladder and vessels
    lo1, hi1 = _ell_bbox(p.liver_right)
    lo2, hi2 = _ell_bbox(p.liver_left)
    blk = cv.block(np.minimum(lo1, lo2), np.maximum(hi1, hi2), True)
    if blk is not None:
        sl, q = blk
        liver = ((_ell_rho2(q, p.liver_right) <= 1.0) | (_ell_rho2(q, p.liver_left) <= 1.0)) & abdomen[sl]
        cv.paint(sl, liver, "liver", LABEL_IDS["liver"])
    porta = (p.liver_right.center[0] - 35.0, p.liver_right.center[1] + 5.0, p.liver_right.center[2] - 15.0)
    confluence = (5.0, p.spine_y + 55.0, porta[2] - 25.0)
    ivc_top = (22.0, p.spine_y + 35.0, p.dome_right[2] - 12.0)
    portal = _trees(
        rng, porta, [(1.0, -0.2, 0.3), (-1.0, 0.5, 0.2), (0.4, 0.8, 0.3), (0.6, -0.4, -0.5)], 36.0, 5.5, 3, 30.0
    )
    hepatic = _trees(rng, ivc_top, [(1.0, 0.2, -0.3), (0.3, 1.0, -0.3), (-0.7, 0.9, -0.2)], 45.0, 5.0, 2, 25.0)
    cv.thin_tubes(np.concatenate([portal, hepatic]), "blood_venous", LABEL_IDS["liver"])
    blk = cv.block(*_ell_bbox(p.gallbladder), True)
    if blk is not None:
        sl, q = blk
        cv.paint(sl, (_ell_rho2(q, p.gallbladder) <= 1.0) & abdomen[sl], "fluid", 0)

    # --- stomach: wall, fluid, air above the air-fluid level (gravity is -y)
    st = p.stomach
    blk = cv.block(*_ell_bbox(st), True)
    if blk is not None:
        sl, q = blk
        r2 = _ell_rho2(q, st)
        inside = (r2 <= 1.0) & abdomen[sl]
        cv.paint(sl, inside, "gi_wall", LABEL_IDS["stomach"])
        lumen = inside & (r2 < 0.8)
        cv.paint(sl, lumen, "fluid", LABEL_IDS["stomach"])
        ylo, yhi = _ell_bbox(st)[0][1], _ell_bbox(st)[1][1]
        level = yhi - p.stomach_air_fraction * (yhi - ylo)
        cv.paint(sl, lumen & (q[1] > level), "air", LABEL_IDS["stomach"])

    # --- spleen: ellipsoid with a concave hilum facing the stomach
    sp_ = p.spleen
    blk = cv.block(*_ell_bbox(sp_), True)
    if blk is not None:
        sl, q = blk
        hil = Ellipsoid(
            center=_vec3(np.asarray(sp_.center) + _rotation(sp_.angles_deg) @ np.array([1.3 * sp_.radii[0], 0, 0])),
            radii=(0.75 * sp_.radii[0], 0.6 * sp_.radii[1], 0.6 * sp_.radii[2]),
            angles_deg=sp_.angles_deg,
        )
        spl = (_ell_rho2(q, sp_) <= 1.0) & (_ell_rho2(q, hil) > 1.0) & abdomen[sl]
        cv.paint(sl, spl, "spleen", LABEL_IDS["spleen"])

    # --- kidneys: cortex, medulla, sinus fat + pelvis opening medially at the hilum
    for name, medial in (("kidney_left", 1.0), ("kidney_right", -1.0)):
        k: Ellipsoid = getattr(p, name)
        blk = cv.block(*_ell_bbox(k), True)
        if blk is None:
            continue
        sl, q = blk
        r2 = _ell_rho2(q, k)
        kid = (r2 <= 1.0) & cavity[sl]
        rot = _rotation(k.angles_deg)
        sinus = Ellipsoid(
            center=_vec3(np.asarray(k.center) + rot @ np.array([medial * 0.55 * k.radii[0], 0, 0])),
            radii=(0.55 * k.radii[0], 0.42 * k.radii[1], 0.55 * k.radii[2]),
            angles_deg=k.angles_deg,
        )
        s2 = _ell_rho2(q, sinus)
        cv.paint(sl, kid, "kidney_cortex", LABEL_IDS[name])
        cv.paint(sl, kid & (r2 < 0.62) & (r2 > 0.2), "kidney_medulla", LABEL_IDS[name])
        cv.paint(sl, kid & (s2 <= 1.0), "fat", 0)
        cv.paint(sl, kid & (s2 <= 0.35), "fluid", 0)  # renal pelvis
        hil = _vec3(np.asarray(k.center) + rot @ np.array([medial * 1.05 * k.radii[0], 0, 0]))
        aorta_pt = (-15.0, p.spine_y + 32.0, hil[2] + 5.0)
        ivc_pt = (22.0, p.spine_y + 35.0, hil[2] + 5.0)
        cv.tubes([(*aorta_pt, *hil, 3.5, 3.0)], "blood_arterial", 0, True, within=0)
        cv.tubes([(*ivc_pt, *hil, 4.5, 4.0)], "blood_venous", 0, True, within=0)

    # portal and splenic veins outside the liver (only through unlabelled tissue)
    splenic_hilum = _vec3(np.asarray(sp_.center) + _rotation(sp_.angles_deg) @ np.array([0.9 * sp_.radii[0], 0, 0]))
    cv.tubes(
        _polyline([confluence, porta], 7.0) + _polyline([confluence, splenic_hilum], 4.5),
        "blood_venous",
        0,
        True,
        within=0,
    )

    # --- lesions, clipped to their organ
    for les in p.lesions:
        e = Ellipsoid(
            center=les.center,
            radii=_vec3([les.radius_mm * f for f in les.elongation]),
            angles_deg=(les.center[0] % 90, les.center[1] % 90, 0.0),
        )
        blk = cv.block(*_ell_bbox(e), True)
        if blk is None:
            continue
        sl, q = blk
        m = (_ell_rho2(q, e) <= 1.0) & ((cv.label[sl] == LABEL_IDS[les.organ]) | (cv.label[sl] == LABEL_IDS["lesion"]))
        cv.paint(sl, m, _LESION_TISSUE[les.kind], LABEL_IDS["lesion"])

    # --- static structures on top: back muscles, great vessels, spine, ribs, sternum
    sy = p.spine_y
    blk = cv.block((-80, sy - 80, -400), (80, sy + 60, 400), False)
    if blk is not None:
        sl, (x, y, z) = blk
        under_fat = cv.depth[sl] >= cv.fat[sl]
        for s in (-1.0, 1.0):
            para = ((x - s * 36.0) / 27.0) ** 2 + ((y - sy + 42.0) / 22.0) ** 2 <= 1.0  # erector spinae
            cv.paint(sl, para & under_fat, "muscle", 0, static=True)
            grow = np.clip(-40.0 - z, 0.0, 140.0)
            psoas = ((x - s * (30.0 + 0.12 * grow)) ** 2 + (y - sy - 8.0) ** 2) <= (6.0 + 0.13 * grow) ** 2
            cv.paint(sl, psoas & (grow > 0), "muscle", 0, static=True)
    aorta_line = [
        (-12.0, sy + 32.0, -260.0),
        (-16.0, sy + 33.0, 40.0),
        (-20.0, sy + 30.0, h.center[2] + 50.0),
        (-8.0, sy + 50.0, h.center[2] + 75.0),
        (8.0, h.center[1] + 5.0, h.center[2] + 60.0),
        (8.0, h.center[1], h.center[2] + 10.0),
    ]
    cv.tubes(_polyline(aorta_line, p.aorta_radius), "blood_arterial", LABEL_IDS["aorta"], False, static=True)
    cv.tubes(
        _polyline(
            [
                (22.0, sy + 35.0, -260.0),
                (22.0, sy + 36.0, p.dome_right[2] - 15.0),
                (12.0, h.center[1] - 15.0, h.center[2] - 35.0),
            ],
            11.0,
        ),
        "blood_venous",
        0,
        False,
        static=True,
    )
    _spine(cv, p)
    _ribs(cv, p)
    couch = _couch(cv, p, affine)
    if couch is not None:  # where nothing else was painted
        sl, hu = couch
        extra[sl] += np.where(cv.tissue[sl] == _T["air"], hu, np.float32(0.0))
    return cv, tex, bias, extra, vz


def _mattress(cv: _Canvas, p: PhantomParams) -> None:
    """Foam from the couch top up to the skin, where the patient lies on a mattress (painted first:
    the body covers it). Static, label 0."""
    if not p.mattress:
        return
    back = -p.body_posterior - p.table_gap_mm
    blk = cv.block((-280, back - 10, -400), (280, -p.body_posterior + 30, 400), False)
    if blk is None:
        return
    sl, (x, y, _z) = blk
    curve = 0.0 if p.table == "plate" else x * x / CRADLE_CURVE_MM
    half_voxel = 0.5 * float(np.abs(cv.affine[1, :3]).sum())  # voxels holding couch stay air (_couch)
    cv.paint(sl, (y >= back + curve + half_voxel) & (y < -p.body_posterior + 25.0) & (np.abs(x) < 200), "foam", 0)


# The couch, layer by layer from its top surface down: (thickness mm, HU). Carbon-fibre skins around
# foam cores, fitted to the couch of the shared planning CT (pancreas_ct_cbct/planct.nii.gz, median
# AP profile under the back: skin peaks near -330 HU at 1.07 mm voxels, an upper core near -700, a
# denser middle layer near -380, a lower core near -900; about 33 mm in all).
CARBON_HU = 450.0


def _plate_layers(total_mm: float) -> list[tuple[float, float]]:
    core = max(total_mm - 8.0, 4.0)
    return [(1.0, CARBON_HU), (0.3 * core, -720.0), (5.0, -360.0), (0.7 * core, -880.0), (1.0, CARBON_HU)]


CRADLE_CURVE_MM = 1600.0  # the cradle's top at x mm from the midline rises x^2 / this (mm)
_CRADLE_SHELL = [(1.0, CARBON_HU), (6.0, -850.0), (1.0, CARBON_HU)]
_CRADLE_BASE = [(2.0, CARBON_HU)]


def _layers_hu(t: np.ndarray, h: np.ndarray | float, layers: list[tuple[float, float]]) -> np.ndarray:
    """HU above air of flat layers at depth t (mm below the top surface), each voxel averaged over its
    extent h (mm) along the layers' normal: partial volume that is right at any spacing (painting
    voxel centres would lose a 1 mm skin on a 4 mm grid)."""
    out = np.zeros(t.shape, np.float32)
    a = 0.0
    for thick, hu in layers:
        b = a + thick
        overlap = np.clip(np.minimum(t + h / 2, b) - np.maximum(t - h / 2, a), 0.0, None)
        out += np.float32(hu + 1000.0) * overlap / h
        a = b
    return out


def _couch(cv: _Canvas, p: PhantomParams, affine: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The couch under the back as HU above air on an index block: a flat sandwich plate (`couch_mm`),
    or a curved carbon cradle (8 mm shell) over a flat base with side rails, `table_gap_mm` below the
    back. In scanner coordinates (not deformed with the patient). Static, label 0, no MR signal."""
    back = -p.body_posterior - p.table_gap_mm
    deep = p.couch_mm + 5.0 if p.table == "plate" else 90.0
    blk = cv.block((-260, back - deep, -400), (260, back + 70, 400), False)
    if blk is None:
        return None
    sl = blk[0]
    x, y, _z = _world(affine, [np.arange(s.start, s.stop, dtype=np.float64) for s in sl])
    cols = affine[:3, :3]  # voxel axes (mm) in world

    def extent(nx, ny):  # a voxel's extent (mm) along the unit normal (nx, ny, 0)
        return sum(np.abs(nx * cols[0, i] + ny * cols[1, i]) for i in range(3)) + np.float32(1e-3)

    def edge(half):  # soft left-right ends of a part |x| < half
        return np.clip((half - np.abs(x)) / extent(1.0, 0.0) + 0.5, 0.0, 1.0)

    if p.table == "plate":  # flat, as the shared planning CT's
        hu = _layers_hu(back - y, extent(0.0, 1.0), _plate_layers(p.couch_mm)) * edge(235.0)
        return sl, hu.astype(np.float32)
    k = CRADLE_CURVE_MM
    slope = 2.0 * x / k
    cos = 1.0 / np.sqrt(1.0 + slope * slope)
    t = (back + x * x / k - y) * cos  # mm below the top surface, along its normal
    h = extent(-slope * cos, cos)
    hu = _layers_hu(t, h, _CRADLE_SHELL) * edge(210.0)
    hu += _layers_hu(back - 75.0 - y, extent(0.0, 1.0), _CRADLE_BASE) * edge(250.0)
    top = back + x * x / k
    rails = _layers_hu(np.abs(x) - 198.5, extent(1.0, 0.0), [(3.0, CARBON_HU)])  # 3 mm walls at |x| = 200
    hu += rails * ((y <= top) & (y >= back - 75.0))
    return sl, hu.astype(np.float32)


def _arms(cv: _Canvas, p: PhantomParams) -> None:
    """Arms down beside the trunk: elliptic cylinders of skin fat, muscle and a humerus, the full
    length of the field. Static, label 0 (not an organ of the label set)."""
    for side in (-1.0, 1.0):
        cx = side * (p.body_half_width + p.arm_gap_mm + 45.0)
        cy = -0.2 * p.body_posterior
        blk = cv.block((cx - 50, cy - 55, -400), (cx + 50, cy + 55, 400), False)
        if blk is None:
            continue
        sl, (x, y, _z) = blk
        r = np.sqrt(((x - cx) / 42.0) ** 2 + ((y - cy) / 50.0) ** 2)  # <= 1 inside the skin
        cv.paint(sl, r <= 1.0, "fat", 0)
        cv.paint(sl, r <= 0.8, "muscle", 0)
        bone = np.sqrt((x - cx) ** 2 + (y - cy - 5.0) ** 2)
        cv.paint(sl, bone <= 12.0, "bone_cortical", 0)
        cv.paint(sl, bone <= 8.0, "bone_cancellous", 0)


def _spine(cv: _Canvas, p: PhantomParams) -> None:
    """Vertebral bodies (cortex + cancellous core), discs, canal and posterior elements."""
    sy = p.spine_y
    blk = cv.block((-50, sy - 75, -400), (50, sy + 25, 400), False)
    if blk is None:
        return
    sl, (x, y, z) = blk
    pitch = p.vertebra_pitch
    dz = z - np.float32(p.vertebra_z0)
    dz = dz - np.float32(pitch) * np.round(dz / np.float32(pitch))  # height relative to the nearest body centre
    half = 0.5 * pitch - 4.0  # body half height (discs ~8 mm)
    r2 = (x / 22.0) ** 2 + ((y - sy) / 17.0) ** 2
    disc = (r2 <= 1.0) & (np.abs(dz) > half)
    body = (r2 <= 1.0) & ~disc
    cv.paint(sl, disc, "disc", 0, static=True)
    cv.paint(sl, body, "bone_cortical", LABEL_IDS["spine"], static=True)
    cv.paint(sl, body & (r2 < 0.8) & (np.abs(dz) < half - 1.5), "bone_cancellous", LABEL_IDS["spine"], static=True)
    yc = sy - 28.0  # spinal canal centre
    rc = np.sqrt(x * x + (y - yc) ** 2)
    arch_z = np.abs(dz + 3.0) < 0.3 * pitch
    arch = arch_z & (rc >= 9.0) & (rc <= 15.0) & (y < yc + 6.0)
    spinous = (np.abs(x) < 4.5) & (y < yc - 12.0) & (y > yc - 34.0) & (np.abs(dz + 6.0 + 0.35 * (yc - 12.0 - y)) < 6.0)
    transverse = (np.abs(x) > 12.0) & (np.abs(x) < 38.0) & (np.abs(y - yc - 2.0) < 5.5) & (np.abs(dz + 3.0) < 6.0)
    post = (arch | spinous | transverse) & (cv.depth[sl] >= cv.fat[sl])
    cv.paint(sl, post, "bone_cortical", LABEL_IDS["spine"], static=True)
    cv.paint(
        sl,
        post & ((rc > 10.5) & (rc < 13.5) | spinous & (np.abs(x) < 2.5)),
        "bone_cancellous",
        LABEL_IDS["spine"],
        static=True,
    )
    cv.paint(sl, rc < 9.0, "csf", 0, static=True)


def _ribs(cv: _Canvas, p: PhantomParams) -> None:
    """12 rib pairs running in the wall muscle from the spine round to the costal cartilages, each
    sloping down anteriorly by `rib_drop`; plus the sternum."""
    z_lo = p.rib_z0 - 11 * p.rib_pitch - p.rib_drop - 20.0
    blk = cv.block((-260, -260, z_lo), (260, 260, 400), False)
    if blk is None:
        return
    sl, (x, y, z) = blk
    # rib track: the middle of the wall muscle; radial = mm inwards from it
    track = cv.depth[sl] - cv.fat[sl]
    radial = track - np.float32(0.5 * p.muscle_mm)
    band = np.abs(radial) < 4.0
    idx = np.nonzero(band)
    xb, yb, zb, rb = x[idx], y[idx], z[idx], radial[idx]
    theta = np.abs(np.arctan2(xb, -yb))  # 0 at the spine, pi at the sternum
    zfront = zb + np.float32(0.5 * p.rib_drop) * (1.0 - np.cos(theta))  # undo the anterior slope
    k = np.round((p.rib_z0 - zfront) / p.rib_pitch)
    dz = zfront - (p.rib_z0 - k * p.rib_pitch)
    ends = np.array([0.82, 0.82, 0.8, 0.8, 0.78, 0.76, 0.74, 0.7, 0.66, 0.6, 0.48, 0.4]) * math.pi
    valid = (k >= 0) & (k <= 11)
    kk = np.clip(k, 0, 11).astype(int)
    e2 = (rb / 3.8) ** 2 + (dz / 6.0) ** 2
    rib = valid & (e2 <= 1.0) & (theta > 0.1 * math.pi) & (theta < ends[kk])
    cart = valid & (kk <= 9) & (e2 <= 0.8) & (theta >= ends[kk]) & (theta < 0.93 * math.pi)
    t = cv.tissue[sl]
    lab = cv.label[sl]
    mov = cv.moving[sl]
    for m, tis, lb in (
        (rib, "bone_cortical", LABEL_IDS["ribs"]),
        (rib & (e2 < 0.35), "bone_cancellous", LABEL_IDS["ribs"]),
        (cart, "cartilage", 0),
    ):
        sel = tuple(i[m] for i in idx)
        t[sel] = _T[tis]
        lab[sel] = lb
        mov[sel] = False
    # sternum: anterior midline plate in the thorax
    st = (np.abs(x) < 16.0) & (y > 0) & (np.abs(radial) < 6.0) & (z > p.rib_z0 - 7 * p.rib_pitch - p.rib_drop + 10.0)
    cv.paint(sl, st, "bone_cortical", 0, static=True)
    cv.paint(sl, st & (np.abs(x) < 12.0) & (np.abs(radial) < 3.0), "bone_cancellous", 0, static=True)
