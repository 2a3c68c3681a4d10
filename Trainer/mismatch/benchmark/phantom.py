"""SYNTHETIC phantoms with CT-like intensities: a branching tree of vessels (:func:`vessel_phantom`) and a
lobulated lesion drawn into a real CT (:func:`lesion_phantom`).

There is no real vessel ground truth in any package these machines can install, so the vessel case of the
benchmark uses this generator, and every result computed on it must be called synthetic (the data set
name is ``synthetic-vessels``). The lesion stands in for a tumour in a CT, which no installable package
ships with a label (``synthetic-lesion-lung``); the same rule applies.

Vessel model
------------
Each root starts a binary tree of straight tubes (capsules: cylinders with spherical caps, so consecutive
tubes join without gaps). At each bifurcation the two children get radius ``parent * ratio`` with
``ratio`` about 0.79 (Murray's law for a symmetric split: r1^3 + r2^3 = r0^3 gives 2^(-1/3) = 0.794),
slightly jittered, and directions rotated away from the parent by 20 to 45 degrees in opposite senses,
plus a random perturbation. A tube is only accepted if it lies inside the allowed region (the volume
minus a margin, or a given mask such as the lungs) and keeps a gap of two voxels from the other roots'
trees, so that the label has exactly one connected component per root. Branching stops at ``max_depth``
or when the radius would fall below ``min_radius_mm`` (by default sqrt(3)/2 of the largest voxel
spacing: then every centreline point has a voxel centre inside its tube, which keeps each tree
26-connected on the voxel grid).

Image formation: the signed distance ``d`` (mm, negative inside) from each voxel centre to the nearest
tube surface gives a partial-volume occupancy ``clip(0.5 - d / h, 0, 1)`` with ``h`` the mean voxel
spacing; the image is ``occ * vessel_hu + (1 - occ) * background``, then a small Gaussian blur and
Gaussian noise. The label is ``occ >= 0.5`` (voxel centre inside a tube).

Conventions: arrays are ``[K, J, I]`` (numpy order of SimpleITK arrays); spacing is given in the same
``(K, J, I)`` order, in mm; points in ``info`` are physical ``(k, j, i)`` positions in mm from the centre
of voxel (0, 0, 0), i.e. ``index * spacing``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["vessel_phantom", "lesion_phantom", "segment_distance", "MURRAY_RATIO"]

MURRAY_RATIO = 2.0 ** (-1.0 / 3.0)  # 0.794: symmetric bifurcation under Murray's law


def segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from points ``[..., 3]`` to the line segment ``a``-``b`` (each ``[3]``, mm)."""
    ab = b - a
    denom = float(ab @ ab)
    pa = points - a
    t = np.clip((pa @ ab) / denom, 0.0, 1.0) if denom > 0 else np.zeros(points.shape[:-1])
    return np.linalg.norm(pa - t[..., None] * ab, axis=-1)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about the unit ``axis`` by ``angle`` radians."""
    return (v * math.cos(angle) + np.cross(axis, v) * math.sin(angle)
            + axis * float(axis @ v) * (1 - math.cos(angle)))


def _random_perpendicular(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = rng.normal(size=3)
    r -= (r @ v) * v
    return _unit(r)


class _Tree:
    """Accepted tubes and the checks a new tube must pass."""

    def __init__(self, allowed_edt: np.ndarray, spacing: np.ndarray, gap_mm: float):
        self.edt = allowed_edt  # distance (mm) from each voxel to outside the allowed region
        self.spacing = spacing
        self.gap = gap_mm
        self.margin = float(np.linalg.norm(spacing)) / 2  # nearest-voxel lookup error of the EDT
        self.segments: list[dict[str, Any]] = []

    def _samples(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = int(math.ceil(np.linalg.norm(b - a) / (0.5 * self.spacing.min()))) + 1
        t = np.linspace(0.0, 1.0, max(n, 2))[:, None]
        return a + t * (b - a)

    def fits(self, a: np.ndarray, b: np.ndarray, radius: float, root: int) -> bool:
        pts = self._samples(a, b)
        idx = np.rint(pts / self.spacing).astype(int)
        shape = np.array(self.edt.shape)
        if (idx < 0).any() or (idx >= shape).any():
            return False
        if (self.edt[idx[:, 0], idx[:, 1], idx[:, 2]] < radius + self.margin).any():
            return False
        for s in self.segments:
            if s["root"] == root:
                continue
            if segment_distance(pts, s["start"], s["end"]).min() < radius + s["radius"] + self.gap:
                return False
        return True


def _texture(rng: np.random.Generator, shape: Sequence[int], std_hu: float) -> np.ndarray:
    """A smooth random field (float32 noise, Gaussian-filtered with sigma 2 voxels) of standard deviation
    ``std_hu``."""
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=2.0)
    texture *= std_hu / max(float(texture.std()), 1e-6)
    return texture


def _scan(occupancy: np.ndarray, inside: np.ndarray | float, background: np.ndarray, blur_voxels: float,
          noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """The phantoms' image formation: ``occupancy * inside + (1 - occupancy) * background`` (partial volume),
    a Gaussian blur of ``blur_voxels`` (the scanner's point spread; none at 0), then Gaussian noise of
    ``noise_hu``; float32."""
    image = occupancy * inside + (1.0 - occupancy) * background
    if blur_voxels > 0:
        image = ndimage.gaussian_filter(image, sigma=blur_voxels)
    return (image + rng.normal(scale=noise_hu, size=image.shape)).astype(np.float32)


def vessel_phantom(shape: Sequence[int] = (64, 128, 128),
                   spacing: Sequence[float] = (1.0, 0.7, 0.7),
                   seed: int = 0,
                   n_roots: int = 2,
                   max_depth: int = 5,
                   root_radius_mm: float = 3.0,
                   radius_ratio: float = MURRAY_RATIO,
                   min_radius_mm: float | None = None,
                   length_factor: tuple[float, float] = (5.0, 9.0),
                   background: np.ndarray | None = None,
                   mask: np.ndarray | None = None,
                   background_hu: float = -850.0,
                   vessel_hu: tuple[float, float] = (40.0, 200.0),
                   noise_hu: float = 25.0,
                   blur_voxels: float = 0.5,
                   max_tries: int = 12) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Build a SYNTHETIC CT-like volume with a branching vessel tree and its label.

    Args:
        shape: ``(K, J, I)`` voxels. Ignored (taken from ``background``) when a background is given.
        spacing: ``(K, J, I)`` voxel spacing in mm.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``: same arguments, same output.
        n_roots: number of separate trees; the label has exactly this many 26-connected components.
        max_depth: bifurcation generations below each root (depth 0 = the root tube).
        root_radius_mm: radius of each root tube, mm.
        radius_ratio: child radius / parent radius at each bifurcation (jittered by +-5 %).
        min_radius_mm: no tube thinner than this (default ``sqrt(3)/2 * max(spacing)``).
        length_factor: a tube's length is ``uniform(*length_factor) * radius`` (then shortened if it does
            not fit).
        background: optional real CT ``float [K, J, I]`` in HU to draw the vessels into (e.g. a chest CT);
            without it a lung-parenchyma-like background of ``background_hu`` with a smooth +-20 HU texture.
        mask: optional boolean ``[K, J, I]`` region that must contain every tube (e.g. the lungs). Without
            it, the volume minus a margin of one voxel.
        background_hu: parenchyma level, HU (used without ``background``).
        vessel_hu: each root's contrast level is drawn uniformly in this range, HU.
        noise_hu: standard deviation of the added Gaussian noise, HU.
        blur_voxels: Gaussian blur sigma in voxels applied before the noise (scanner PSF).
        max_tries: attempts per tube before a branch is ended.

    Returns:
        ``(image, label, info)``: ``image`` float32 ``[K, J, I]`` in HU; ``label`` uint8 ``[K, J, I]``
        (1 = vessel, 0 = not); ``info`` with ``segments`` (list of dicts: ``start``, ``end`` (mm, physical
        ``(k, j, i)``), ``radius`` (mm), ``depth``, ``root``, ``parent`` (index or -1)), ``vessel_hu`` per
        root, ``spacing``, ``shape``, ``seed``, ``min_radius_mm``, ``occupancy`` (float32 ``[K, J, I]``,
        partial-volume fraction 0..1) and ``synthetic`` = True.
    """
    rng = np.random.default_rng(seed)
    spacing_a = np.asarray(spacing, dtype=float)
    if spacing_a.shape != (3,) or (spacing_a <= 0).any():
        raise ValueError("spacing must be three positive numbers (K, J, I order, mm)")
    if background is not None:
        background = np.asarray(background, dtype=np.float32)
        shape = background.shape
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 3:
        raise ValueError("shape must be (K, J, I) with at least 3 voxels along each axis")
    if min_radius_mm is None:
        min_radius_mm = math.sqrt(3) / 2 * float(spacing_a.max())
    if root_radius_mm < min_radius_mm:
        raise ValueError(f"root_radius_mm {root_radius_mm} is below the minimum radius {min_radius_mm:.2f} mm "
                         "that keeps tubes connected on this grid")

    if mask is None:
        allowed = np.zeros(shape, dtype=bool)
        allowed[1:-1, 1:-1, 1:-1] = True
    else:
        allowed = np.asarray(mask, dtype=bool)
        if allowed.shape != shape:
            raise ValueError(f"mask shape {allowed.shape} differs from the volume shape {shape}")
        if not allowed.any():
            raise ValueError("mask is empty")
    edt = ndimage.distance_transform_edt(allowed, sampling=spacing_a)
    tree = _Tree(edt, spacing_a, gap_mm=2.0 * float(spacing_a.max()))

    # Roots: start deep inside the allowed region, pointing towards its centre of mass.
    centre = np.array(ndimage.center_of_mass(allowed)) * spacing_a
    deep = np.argwhere(edt >= root_radius_mm + tree.margin)
    if len(deep) == 0:
        raise ValueError("the allowed region is too thin for the root radius")
    stack: list[tuple[np.ndarray, np.ndarray, float, int, int, int]] = []
    for root in range(n_roots):
        for _ in range(200):
            start = deep[rng.integers(len(deep))] * spacing_a
            direction = _unit(centre - start + rng.normal(scale=10.0, size=3))
            if np.linalg.norm(direction) == 0:
                direction = _unit(rng.normal(size=3))
            length = rng.uniform(*length_factor) * root_radius_mm
            placed = False
            for shrink in (1.0, 0.75, 0.5):
                end = start + direction * length * shrink
                if tree.fits(start, end, root_radius_mm, root):
                    placed = True
                    break
            if placed:
                break
        else:
            raise ValueError(f"could not place root {root}: the volume or mask is too small for {n_roots} roots "
                             f"of radius {root_radius_mm} mm")
        tree.segments.append({"start": start, "end": end, "radius": float(root_radius_mm), "depth": 0,
                              "root": root, "parent": -1})
        stack.append((end, direction, float(root_radius_mm), 0, root, len(tree.segments) - 1))

    # Grow the trees breadth-first so that roots compete fairly for space.
    while stack:
        start, direction, radius, depth, root, parent = stack.pop(0)
        if depth >= max_depth:
            continue
        axis = _random_perpendicular(direction, rng)
        for sign in (1.0, -1.0):
            child_r = radius * radius_ratio * rng.uniform(0.95, 1.05)
            if child_r < min_radius_mm:
                continue
            for attempt in range(max_tries):
                angle = sign * math.radians(rng.uniform(20.0, 45.0))
                d = _unit(_rotate(direction, axis, angle) + rng.normal(scale=0.15, size=3))
                length = rng.uniform(*length_factor) * child_r * (1.0 - 0.5 * attempt / max_tries)
                end = start + d * length
                if tree.fits(start, end, child_r, root):
                    tree.segments.append({"start": start, "end": end, "radius": float(child_r),
                                          "depth": depth + 1, "root": root, "parent": parent})
                    stack.append((end, d, float(child_r), depth + 1, root, len(tree.segments) - 1))
                    break

    # Signed distance to the nearest tube surface (mm), computed per tube over its bounding box.
    sdist = np.full(shape, np.inf, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int16)
    h = float(spacing_a.mean())
    pad = 2.0 * h
    for s in tree.segments:
        a, b, r = s["start"], s["end"], s["radius"]
        lo = np.maximum(np.floor((np.minimum(a, b) - r - pad) / spacing_a).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(a, b) + r + pad) / spacing_a).astype(int) + 1, shape)
        if (hi <= lo).any():
            continue
        ks, js, is_ = (np.arange(lo[n], hi[n]) * spacing_a[n] for n in range(3))
        ab = b - a
        denom = float(ab @ ab) or 1.0
        pk, pj, pi = ks[:, None, None] - a[0], js[None, :, None] - a[1], is_[None, None, :] - a[2]
        t = np.clip((pk * ab[0] + pj * ab[1] + pi * ab[2]) / denom, 0.0, 1.0)
        dist = np.sqrt((pk - t * ab[0]) ** 2 + (pj - t * ab[1]) ** 2 + (pi - t * ab[2]) ** 2) - r
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        closer = dist < sdist[box]
        sdist[box] = np.where(closer, dist, sdist[box])
        owner[box] = np.where(closer, s["root"], owner[box])

    occupancy = np.clip(0.5 - sdist / h, 0.0, 1.0).astype(np.float32)
    label = (occupancy >= 0.5).astype(np.uint8)

    levels = rng.uniform(*vessel_hu, size=n_roots).astype(np.float32)
    vessel = np.where(owner >= 0, levels[np.maximum(owner, 0)], 0.0).astype(np.float32)
    bg = (background_hu + _texture(rng, shape, 20.0)).astype(np.float32) if background is None else background
    image = _scan(occupancy, vessel, bg, blur_voxels, noise_hu, rng)

    segments = [{"start": s["start"].tolist(), "end": s["end"].tolist(), "radius": s["radius"],
                 "depth": s["depth"], "root": s["root"], "parent": s["parent"]} for s in tree.segments]
    info = {"name": "synthetic-vessels", "synthetic": True, "segments": segments,
            "vessel_hu": levels.tolist(), "spacing": spacing_a.tolist(), "shape": list(shape), "seed": seed,
            "n_roots": n_roots, "min_radius_mm": float(min_radius_mm), "radius_ratio": radius_ratio,
            "occupancy": occupancy}
    return image, label, info


def lesion_phantom(background: np.ndarray, mask: np.ndarray, spacing: Sequence[float], seed: int = 0,
                   radius_mm: tuple[float, float] = (12.0, 16.0),
                   lobes: int = 4,
                   roughness_mm: float = 1.5,
                   lesion_hu: tuple[float, float] = (20.0, 60.0),
                   texture_hu: float = 15.0,
                   noise_hu: float = 25.0,
                   blur_voxels: float = 0.5,
                   pleural: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A SYNTHETIC lobulated soft-tissue lesion (a stand-in for a lung tumour) drawn into a real CT.

    The lesion is the union of a central sphere (0.75 of the radius ``R``, drawn in ``radius_mm``) and
    ``lobes`` smaller spheres (0.35 to 0.6 ``R``) centred 0.3 to 0.6 ``R`` away in random directions, its
    surface roughened by a smooth random field of standard deviation ``roughness_mm``, and kept within the
    ``mask`` grown by one voxel: with ``pleural`` its centre lies 0.5 to 0.9 ``R`` from the mask's edge, so
    it reaches the pleura and meets the chest wall or the mediastinum, whose soft tissue has the lesion's
    intensities (the hard case for growing from painted voxels); without, at least ``R`` + 2 mm inside.
    Its centre is at least ``1.2 R`` from the first and last slice, so that slices past both of its ends
    exist. Image formation as :func:`vessel_phantom`'s: partial-volume occupancy from the signed distance,
    an intensity drawn in ``lesion_hu`` with a smooth texture of ``texture_hu``, a Gaussian blur of
    ``blur_voxels`` and noise of ``noise_hu`` over the whole volume.

    Args:
        background: real CT ``float [K, J, I]`` in HU; mask: boolean ``[K, J, I]`` (the lungs);
        spacing: ``(K, J, I)`` mm. Everything random comes from ``numpy.random.default_rng(seed)``.

    Returns:
        ``(image, label, info)``: ``image`` float32 HU, ``label`` uint8 (1 = lesion; one 26-connected
        component), ``info`` with ``centre_mm`` (physical ``(k, j, i)`` from voxel (0, 0, 0)), ``radius_mm``,
        ``lesion_hu``, ``slices`` (first and last slice with the lesion), ``spacing``, ``shape``, ``seed``,
        ``pleural``, ``synthetic`` = True.
    """
    rng = np.random.default_rng(seed)
    spacing_a = np.asarray(spacing, dtype=float)
    background = np.asarray(background, dtype=np.float32)
    allowed = np.asarray(mask, dtype=bool)
    if spacing_a.shape != (3,) or (spacing_a <= 0).any():
        raise ValueError("spacing must be three positive numbers (K, J, I) in mm")
    if background.ndim != 3 or allowed.shape != background.shape:
        raise ValueError(f"background {background.shape} and mask {allowed.shape} must be one 3D shape")
    shape = background.shape
    r_mm = float(rng.uniform(*radius_mm))
    edt = ndimage.distance_transform_edt(allowed, sampling=spacing_a)
    k_margin = int(math.ceil(1.2 * r_mm / spacing_a[0]))
    near = (edt >= 0.5 * r_mm) & (edt <= 0.9 * r_mm) if pleural else edt >= r_mm + 2.0
    near[:k_margin] = near[shape[0] - k_margin:] = False
    candidates = np.argwhere(near)
    if len(candidates) == 0:
        raise ValueError(f"no place in the mask for a lesion of radius {r_mm:.1f} mm")
    centre = candidates[rng.integers(len(candidates))] * spacing_a

    spheres = [(centre, 0.75 * r_mm)]
    for _ in range(lobes):
        direction = _unit(rng.normal(size=3))
        spheres.append((centre + direction * rng.uniform(0.3, 0.6) * r_mm, rng.uniform(0.35, 0.6) * r_mm))
    # the signed distance (mm) in a box around the lesion; +inf elsewhere
    reach = 1.6 * r_mm + 3 * roughness_mm
    lo = np.maximum(np.floor((centre - reach) / spacing_a).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / spacing_a).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing_a)], indexing="ij"), -1)
    sd_box = np.min([np.linalg.norm(grid - c, axis=-1) - r for c, r in spheres], axis=0)
    field = ndimage.gaussian_filter(rng.normal(size=sd_box.shape), sigma=3.0 / spacing_a)
    sd_box += field * (roughness_mm / max(float(field.std()), 1e-6))
    sdist = np.full(shape, np.inf, dtype=np.float64)
    sdist[box] = sd_box
    sdist[~ndimage.binary_dilation(allowed, iterations=1)] = np.inf   # not into the chest wall
    h = float(spacing_a.mean())
    occupancy = np.clip(0.5 - sdist / h, 0.0, 1.0).astype(np.float32)
    parts, n = ndimage.label(occupancy >= 0.5, structure=np.ones((3, 3, 3)))
    if n == 0:
        raise ValueError("the lesion fell outside the mask")
    largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
    occupancy[(parts != largest) & (parts > 0)] = 0.0   # one lesion: stray bits cut by the mask are dropped
    label = (parts == largest).astype(np.uint8)

    level = float(rng.uniform(*lesion_hu))
    image = _scan(occupancy, level + _texture(rng, shape, texture_hu), background, blur_voxels, noise_hu, rng)
    ks = np.flatnonzero(label.any(axis=(1, 2)))
    info = {"name": "synthetic-lesion", "synthetic": True, "centre_mm": centre.tolist(), "radius_mm": r_mm,
            "lesion_hu": level, "slices": [int(ks[0]), int(ks[-1])], "spacing": spacing_a.tolist(),
            "shape": list(shape), "seed": seed, "pleural": pleural}
    return image, label, info
