"""Named data sets for the benchmark, and the draw of labelled / unlabelled / test slices.

Only data shipped inside installable packages is used; nothing is downloaded at run time.

=======================  ==============================================================================
name                     what
=======================  ==============================================================================
``ctchest-lungs``        slicerio's ``CTChest4.nrrd`` (real chest CT, 128x128x34, 3.05x3.05x10 mm, HU) with
                         the lungs of its ``Segmentation.seg.nrrd`` (segments "right lung" + "left lung",
                         semi-automatic Segment Editor labels). Binary, or right = 1 / left = 2 with
                         ``multiclass=True``.
``ctchest-lungs-lr``     the same lungs as two classes: right lung = 1, left lung = 2 (the multi-class case).
``ctchest-spine``        the same CT with its vertebral column (the cervical, thoracic and lumbar segments as one
                         class): a small bone structure on every slice, beside ribs of the same intensity.
``ctchest-ribs``         the same CT with its ribs: thin bone arcs in many parts on every slice, a quarter to a
                         third of a slice's rib voxels on rib in the next (10 mm) slice.
``ctchest-lungs-spine-ribs``  the same CT with three classes painted at once: lungs = 1, vertebral column = 2,
                         ribs = 3.
``ctchest-tissue``       the same CT with its segment "tissue": the soft tissue of the chest wall and the
                         mediastinum, a large structure in 3 to 52 pieces a slice.
``mni152-gm``            nilearn's MNI152 2009 T1 template (skull-stripped, 1 mm) with grey matter =
                         the shipped GM probability map > 0.5. Cropped to the brain, optional block
                         downsampling (``downsample=2`` by default, for speed).
``mni152-wm``            as ``mni152-gm``, with white matter = the shipped WM probability map > 0.5.
``mni152-tissue``        as ``mni152-gm``, grey matter = 1 and white matter = 2 (brain tissue, two classes).
``mni152-csf``           as ``mni152-gm``, with the cerebrospinal fluid spaces: a label *derived* from the templates,
                         not drawn by a person (inside the brain mask eroded by 3 mm, neither GM nor WM > 0.5,
                         darker than the 15th percentile of the T1 there; the two largest connected parts: the
                         ventricles and the sulci joined to them). Thin and in many pieces on a slice.
``pyradiomics-brain1``   pyradiomics 3.0.1's ``brain1`` case (T1 post-contrast MRI, 25x256x256, tumour on 7
                         k-slices; slice axis k) from its source distribution (see below).
``pyradiomics-breast1``  pyradiomics 3.0.1's ``breast1`` case (breast MRI crop, 21x120x45 [K, J, I], lesion on
                         only 3 k-slices but on 9 of the 45 i-slices: slice axis i, numpy axis 2).
``synthetic-vessels``    the SYNTHETIC vessel phantom (:func:`mismatch.benchmark.phantom.vessel_phantom`) in
                         a synthetic parenchyma background; ``in_lungs=True`` places it inside CTChest4's lungs
                         (resampled to ``lung_spacing``; the CT's own vessels are then present but unlabelled).
``synthetic-lesion-lung``  a SYNTHETIC lobulated soft-tissue lesion (:func:`~mismatch.benchmark.phantom.
                         lesion_phantom`, a stand-in for a lung tumour) in the same resampled CT, reaching the
                         pleura: about 25 mm across, on 11 of the 115 slices (2.5 mm).
``synthetic-lesion-lung-fine``  the same lesion in the same lungs resampled to 0.75 mm in-plane (a clinical
                         CT's pixel; 408 x 282 pixels a slice, larger than the training patch), 2.5 mm slices.
=======================  ==============================================================================

Every loader returns a list of :class:`Case`: image ``float32 [C, K, J, I]``, label ``uint8 [K, J, I]``
(0 = background, 1..N classes), the grid as :class:`mismatch.io.Geometry` (SimpleITK / LPS), a recommended
slice axis (numpy axis; 0 = ``k``) and an intensity window (HU) or None.

The pyradiomics cases are read from the pyradiomics 3.0.1 source distribution (the ``.tar.gz`` itself or
its untarred ``data/``), looked for in this order: the ``data_dir`` argument (``--data-dir``),
``$MISMATCH_DATA_DIR``, then ``<repository>/.data`` (where ``scripts/setup-benchmark.sh`` puts it). Only
``brain1`` and ``breast1`` are used: the archive's other cases are reserved for independent checks of the
product and have no loader here on purpose.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..data import CT_WINDOW, ctchest_segments, label_values
from ..errors import UserError
from ..io import Geometry

__all__ = ["Case", "DATASETS", "load_dataset", "draw_split", "PYRADIOMICS_DOWNLOAD", "DATA_DIR_ENV",
           "REPO_DATA_DIR", "data_dirs"]

DATA_DIR_ENV = "MISMATCH_DATA_DIR"
PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_DOWNLOAD = (f"pip download --no-deps --no-binary pyradiomics --no-build-isolation "
                        f"pyradiomics=={PYRADIOMICS_VERSION} -d DIR")
#: ``<repository root>/.data``: where ``scripts/setup-benchmark.sh`` downloads the pyradiomics sdist
#: (datasets.py -> benchmark -> mismatch -> Trainer -> repository root); used only if the folder exists.
REPO_DATA_DIR = Path(__file__).resolve().parents[3] / ".data"
SETUP_SCRIPT = "scripts/setup-benchmark.sh"
#: the only pyradiomics cases the benchmark may use (the others are reserved for independent checks)
PYRADIOMICS_CASES = ("brain1", "breast1")


@dataclass
class Case:
    """One benchmark case.

    Attributes:
        name: data set name (``synthetic-...`` for synthetic data).
        image: float32 ``[C, K, J, I]`` (CT in HU; MRI in its own units).
        label: uint8 ``[K, J, I]``, 0 = background, 1..N = classes.
        geometry: the image grid (size (I, J, K), spacing (I, J, K) mm, origin, direction; LPS).
        axis: recommended slice axis, numpy axis of ``label`` (0 = ``k``).
        window: intensity window ``(low, high)`` (HU for CT) or None.
        classes: label value -> class name.
        synthetic: True for generated data: results on it must be called synthetic.
        source: where the data comes from (package, file, licence notice).
        extra: loader-specific details (e.g. the phantom's tubes).
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    axis: int = 0
    window: tuple[float, float] | None = None
    classes: dict[int, str] = field(default_factory=lambda: {1: "foreground"})
    synthetic: bool = False
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in ``(K, J, I)`` order, mm (numpy axis order)."""
        s = self.geometry.spacing
        return (s[2], s[1], s[0])


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _geometry_after_crop_and_downsample(geom: Geometry, lo_kji: Sequence[int], shape_kji: Sequence[int],
                                        factor: int = 1) -> Geometry:
    """Grid of ``array[lo:lo+shape]`` block-averaged by ``factor``: origin moves to the first block's centre."""
    direction = np.asarray(geom.direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(geom.spacing, dtype=float)
    offset_ijk = np.asarray(lo_kji[::-1], dtype=float) + (factor - 1) / 2.0
    origin = np.asarray(geom.origin) + direction @ (offset_ijk * spacing)
    size = tuple(int(s) // factor for s in shape_kji[::-1])
    return Geometry(size, tuple(float(s) for s in spacing * factor), tuple(float(o) for o in origin),
                    geom.direction)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    k, j, i = (s // f for s in a.shape)
    a = a[:k * f, :j * f, :i * f]
    return a.reshape(k, f, j, f, i, f).mean(axis=(1, 3, 5))


def _ctchest(*segments: str) -> tuple[sitk.Image, list[np.ndarray]]:
    """CTChest4 (sitk image, HU) and the masks ``[K, J, I]`` of the named ``segments`` (lower case) on the
    image grid (:func:`mismatch.data.ctchest_segments`, as the demo reads it)."""
    image, found, geometry = ctchest_segments()
    names = {n.lower(): n for n in found}
    missing = [s for s in segments if s not in names]
    if missing:
        raise UserError(f"CTChest4 segmentation has no {', '.join(missing)} segment (found {sorted(found)})")
    ct = sitk.GetImageFromArray(image[0])
    geometry.apply_to(ct)
    return ct, [found[names[s]] for s in segments]


def _ctchest_with_lungs() -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """CTChest4 (sitk image, HU) and its right / left lung masks ``[K, J, I]``."""
    ct, (right, left) = _ctchest("right lung", "left lung")
    return ct, right, left


def load_ctchest_lungs(multiclass: bool = False, name: str = "ctchest-lungs", **_: Any) -> list[Case]:
    """``ctchest-lungs``: slicerio's CTChest4 with lungs (binary, or right = 1, left = 2). Axis k."""
    ct, right, left = _ctchest_with_lungs()
    label = np.zeros(right.shape, dtype=np.uint8)
    if multiclass:
        label[right] = 1
        label[left & ~right] = 2
        classes = {1: "right lung", 2: "left lung"}
    else:
        label[right | left] = 1
        classes = {1: "lungs"}
    image = _array(ct).astype(np.float32)[None]
    return [Case(name, image, label, Geometry.from_sitk(ct), axis=0, window=CT_WINDOW,
                 classes=classes, source="slicerio data/CTChest4.nrrd + Segmentation.seg.nrrd (MIT)")]


def load_ctchest_lungs_lr(**options: Any) -> list[Case]:
    """``ctchest-lungs-lr``: CTChest4 with right lung = 1, left lung = 2 (two classes). Axis k."""
    options.pop("multiclass", None)
    options.pop("name", None)
    return load_ctchest_lungs(multiclass=True, name="ctchest-lungs-lr", **options)


def load_ctchest_segment(segments: Sequence[str], name: str, class_name: str) -> list[Case]:
    """CTChest4 with the union of its ``segments`` (lower-case names) as class 1."""
    ct, masks = _ctchest(*segments)
    label = np.logical_or.reduce(masks).astype(np.uint8)
    return [Case(name, _array(ct).astype(np.float32)[None], label, Geometry.from_sitk(ct), axis=0,
                 window=CT_WINDOW, classes={1: class_name},
                 source="slicerio data/CTChest4.nrrd + Segmentation.seg.nrrd (MIT)")]


def load_ctchest_spine(**_: Any) -> list[Case]:
    """``ctchest-spine``: CTChest4 with its vertebral column (cervical + thoracic + lumbar) as one class."""
    return load_ctchest_segment(["cervical vertebral column", "thoracic vertebral column",
                                 "lumbar vertebral column"], "ctchest-spine", "vertebral column")


def load_ctchest_ribs(**_: Any) -> list[Case]:
    """``ctchest-ribs``: CTChest4 with its ribs as one class."""
    return load_ctchest_segment(["ribs"], "ctchest-ribs", "ribs")


def load_ctchest_tissue(**_: Any) -> list[Case]:
    """``ctchest-tissue``: CTChest4 with its segment "tissue" (the chest wall's and mediastinum's soft tissue)."""
    return load_ctchest_segment(["tissue"], "ctchest-tissue", "soft tissue")


def load_ctchest_lungs_spine_ribs(**_: Any) -> list[Case]:
    """``ctchest-lungs-spine-ribs``: CTChest4 with lungs = 1, vertebral column = 2 and ribs = 3 (a voxel in two
    segments takes the later class). Axis k."""
    groups = {"lungs": ["right lung", "left lung"],
              "vertebral column": ["cervical vertebral column", "thoracic vertebral column",
                                   "lumbar vertebral column"],
              "ribs": ["ribs"]}
    names = [s for segments in groups.values() for s in segments]
    ct, masks = _ctchest(*names)
    found = dict(zip(names, masks))
    label = np.zeros(masks[0].shape, dtype=np.uint8)
    for c, segments in enumerate(groups.values(), start=1):
        label[np.logical_or.reduce([found[s] for s in segments])] = c
    return [Case("ctchest-lungs-spine-ribs", _array(ct).astype(np.float32)[None], label, Geometry.from_sitk(ct),
                 axis=0, window=CT_WINDOW, classes=dict(enumerate(groups, start=1)),
                 source="slicerio data/CTChest4.nrrd + Segmentation.seg.nrrd (MIT)")]


def load_mni152_gm(downsample: int = 2, crop: bool = True, tissue: str = "gm", **_: Any) -> list[Case]:
    """``mni152-gm`` / ``mni152-wm``: MNI152 2009 T1 template, grey (white) matter = the GM (WM)
    probability > 0.5 (after block averaging).

    Args:
        downsample: block-average factor (1 = the shipped 1 mm grid, 197x233x189).
        crop: crop to the brain's bounding box (template > 0) plus 2 voxels.
        tissue: ``"gm"``, ``"wm"``, ``"both"`` (``mni152-tissue``: grey matter = 1, white matter = 2) or
            ``"csf"`` (``mni152-csf``, derived from the T1, GM and WM templates and the brain mask).
    """
    if tissue not in ("gm", "wm", "both", "csf"):
        raise ValueError(f"tissue must be 'gm', 'wm', 'both' or 'csf', not {tissue!r}")
    name = "mni152-tissue" if tissue == "both" else f"mni152-{tissue}"
    read = ("gm", "wm") if tissue in ("both", "csf") else (tissue,)   # the probability maps read
    maps = ("csf",) if tissue == "csf" else read                        # the classes, in label order
    try:
        from nilearn import datasets as nilearn_datasets
    except ImportError as exc:
        raise UserError(f"{name} needs nilearn: pip install nilearn") from exc
    t1 = nilearn_datasets.load_mni152_template(resolution=1)  # the files shipped in the wheel, no download
    probs = []
    for m in read:
        template = getattr(nilearn_datasets, f"load_mni152_{m}_template")(resolution=1)
        if not np.allclose(t1.affine, template.affine) or t1.shape != template.shape:
            raise UserError(f"nilearn's MNI152 T1 and {m.upper()} templates are not on the same grid")
        # nibabel arrays are [x, y, z] (RAS); ours are [K, J, I] = [z, y, x], geometry in LPS.
        probs.append(np.asarray(template.get_fdata(), dtype=np.float32).transpose(2, 1, 0))
    image = np.asarray(t1.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    if tissue == "csf":
        mask = np.asarray(nilearn_datasets.load_mni152_brain_mask(resolution=1).get_fdata()).transpose(2, 1, 0) > 0
        probs = [_csf(image, mask, *probs)]
    affine = np.asarray(t1.affine, dtype=float)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = ras_to_lps @ (affine[:3, :3] / spacing)
    origin = ras_to_lps @ affine[:3, 3]
    geom = Geometry(tuple(int(s) for s in image.shape[::-1]), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel()))
    lo = np.zeros(3, dtype=int)
    if crop:
        nz = np.argwhere(image > 0)
        lo = np.maximum(nz.min(0) - 2, 0)
        hi = np.minimum(nz.max(0) + 3, image.shape)
        image = image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        probs = [p[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] for p in probs]
    f = int(downsample)
    if f < 1:
        raise ValueError("downsample must be >= 1")
    geom = _geometry_after_crop_and_downsample(geom, lo, image.shape, f)
    image = _block_mean(image, f).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    for c, p in enumerate(probs, start=1):   # probabilities of tissues summing to at most 1: one above 0.5
        label[_block_mean(p, f) > 0.5] = c
    names = {"gm": "grey matter", "wm": "white matter", "csf": "cerebrospinal fluid (derived)"}
    return [Case(name, image[None], label, geom, axis=0, window=None,
                 classes={c: names[m] for c, m in enumerate(maps, start=1)},
                 source=f"nilearn MNI152 2009 templates (T1, {' and '.join(m.upper() for m in read)} probability); "
                        "MNI template copyright notice kept by nilearn")]


def _csf(t1: np.ndarray, brain: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """``mni152-csf``'s label at 1 mm, as 0 / 1 floats: inside ``brain`` eroded by 3 voxels, neither ``gm`` nor
    ``wm`` above 0.5, ``t1`` below its 15th percentile there; the two largest 6-connected parts."""
    inside = ndimage.binary_erosion(brain, iterations=3)
    csf = inside & (gm < 0.5) & (wm < 0.5) & (t1 < np.percentile(t1[inside], 15))
    parts, n = ndimage.label(csf)
    sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    return np.isin(parts, 1 + np.argsort(sizes)[::-1][:2]).astype(np.float32)


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for data that no package installs, in order: ``data_dir``,
    ``$MISMATCH_DATA_DIR``, then ``<repository>/.data`` (only if it exists)."""
    folders = [Path(f) for f in (data_dir, os.environ.get(DATA_DIR_ENV)) if f]
    if Path(REPO_DATA_DIR).is_dir():
        folders.append(Path(REPO_DATA_DIR))
    return list(dict.fromkeys(folders))


def _find_pyradiomics_case(case: str, data_dir: str | os.PathLike | None) -> tuple[Path, Path, Any]:
    """Paths of ``{case}_image.nrrd`` / ``{case}_label.nrrd`` (and a temporary folder to keep alive).

    Each folder of :func:`data_dirs` is searched in turn for the untarred files (``{case}_*.nrrd``,
    ``pyradiomics-3.0.1/data/`` or ``data/``), then for ``pyradiomics-3.0.1.tar.gz``, whose two members are
    extracted into a temporary folder.
    """
    if case not in PYRADIOMICS_CASES:
        raise UserError(f"pyradiomics case {case!r} is not used by the benchmark (only "
                        f"{', '.join(PYRADIOMICS_CASES)}; the others are reserved for independent checks)")
    how = (f"run {SETUP_SCRIPT} once (it downloads the pyradiomics {PYRADIOMICS_VERSION} source distribution "
           f"into {REPO_DATA_DIR}), or get it with: {PYRADIOMICS_DOWNLOAD} and pass DIR as the data folder "
           f"(--data-dir) or set {DATA_DIR_ENV}=DIR")
    folders = data_dirs(data_dir)
    if not folders:
        raise UserError(f"pyradiomics-{case} needs the pyradiomics {PYRADIOMICS_VERSION} source distribution; {how}")
    for root in folders:
        for sub in ("", f"pyradiomics-{PYRADIOMICS_VERSION}/data", "data"):
            img, lab = root / sub / f"{case}_image.nrrd", root / sub / f"{case}_label.nrrd"
            if img.exists() and lab.exists():
                return img, lab, None
        archive = root / f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
        if archive.exists():
            return _extract_pyradiomics_case(archive, case, how)
    raise UserError(f"no pyradiomics {PYRADIOMICS_VERSION} source distribution (or its data/{case}_image.nrrd) "
                    f"in {', '.join(str(f) for f in folders)}; {how}")


def _extract_pyradiomics_case(archive: Path, case: str, how: str) -> tuple[Path, Path, Any]:
    tmp = tempfile.TemporaryDirectory(prefix="mismatch-pyradiomics-")
    members = [f"pyradiomics-{PYRADIOMICS_VERSION}/data/{case}_{kind}.nrrd" for kind in ("image", "label")]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in members:
                try:
                    info = tar.getmember(m)
                except KeyError as exc:
                    raise UserError(f"{archive} has no {m}; {how}") from exc
                extracted = tar.extractfile(info)
                if extracted is None:
                    raise UserError(f"{archive}: {m} is not a regular file; {how}")
                (Path(tmp.name) / Path(m).name).write_bytes(extracted.read())
    except (tarfile.TarError, OSError) as exc:
        tmp.cleanup()
        raise UserError(f"cannot read {archive} ({exc}); {how}") from exc
    except BaseException:
        tmp.cleanup()
        raise
    return Path(tmp.name) / Path(members[0]).name, Path(tmp.name) / Path(members[1]).name, tmp


def _load_pyradiomics(case: str, axis: int, description: str, label_name: str,
                      data_dir: str | os.PathLike | None) -> list[Case]:
    """One pyradiomics case: the image, and its label (> 0 = foreground) resampled onto the image grid."""
    img_path, lab_path, keep = _find_pyradiomics_case(case, data_dir)
    try:
        image = sitk.ReadImage(str(img_path))
        label = sitk.ReadImage(str(lab_path))
        label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        arr = _array(image).astype(np.float32)[None]
        lab = (_array(label) > 0).astype(np.uint8)
    finally:
        if keep is not None:
            keep.cleanup()
    return [Case(f"pyradiomics-{case}", arr, lab, Geometry.from_sitk(image), axis=axis, window=None,
                 classes={1: label_name},
                 source=f"pyradiomics {PYRADIOMICS_VERSION} sdist data/{case} ({description}; BSD-3)")]


def load_pyradiomics_brain1(data_dir: str | os.PathLike | None = None, **_: Any) -> list[Case]:
    """``pyradiomics-brain1``: T1 post-contrast brain MRI (25x256x256) with a tumour label on 7 k-slices
    (binary). Axis k (numpy axis 0).

    Reads ``pyradiomics-3.0.1.tar.gz`` (or its untarred ``data/``) from the folders of :func:`data_dirs`;
    never downloads (a :class:`~mismatch.errors.UserError` says how to get it).
    """
    return _load_pyradiomics("brain1", 0, "T1 post-contrast brain MRI", "tumour", data_dir)


def load_pyradiomics_breast1(data_dir: str | os.PathLike | None = None, **_: Any) -> list[Case]:
    """``pyradiomics-breast1``: breast MRI crop, 21x120x45 voxels ``[K, J, I]``, with a lesion label (binary).

    The lesion lies on only 3 of the 21 k-slices but on 9 of the 45 i-slices, so the recommended slice axis
    is ``i`` (numpy axis 2): labelled and test slices are drawn along ``i``. Read like
    :func:`load_pyradiomics_brain1`.
    """
    return _load_pyradiomics("breast1", 2, "breast MRI", "lesion", data_dir)


def _ctchest_lungs_resampled(spacing_kji: Sequence[float]) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """CTChest4 (HU, linear) and its lungs (nearest) resampled to ``spacing_kji`` mm, keeping the physical
    extent, and cropped to the lungs plus 3 voxels: ``(ct [K, J, I] float32, lungs bool, geometry)``."""
    ct, right, left = _ctchest_with_lungs()
    lungs = sitk.GetImageFromArray((right | left).astype(np.uint8))
    lungs.CopyInformation(ct)
    new_spacing = tuple(float(s) for s in spacing_kji[::-1])  # (I, J, K)
    new_size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(ct.GetSize(), ct.GetSpacing(), new_spacing)]
    ref = sitk.Image(new_size, sitk.sitkFloat32)
    ref.SetSpacing(new_spacing)
    ref.SetDirection(ct.GetDirection())
    # keep the physical extent: first voxel centre moved by half the spacing change
    shift = np.asarray(ct.GetDirection()).reshape(3, 3) @ ((np.asarray(new_spacing) - ct.GetSpacing()) / 2)
    ref.SetOrigin(tuple(float(o) for o in np.asarray(ct.GetOrigin()) + shift))
    ct_r = _array(sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, -1000.0))
    mask_r = _array(sitk.Resample(lungs, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool)
    nz = np.argwhere(mask_r)
    lo = np.maximum(nz.min(0) - 3, 0)
    hi = np.minimum(nz.max(0) + 4, mask_r.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    geom = _geometry_after_crop_and_downsample(Geometry.from_sitk(ref), lo, ct_r[box].shape, 1)
    return ct_r[box], mask_r[box], geom


def load_synthetic_vessels(seed: int = 0, in_lungs: bool = False, shape: Sequence[int] = (64, 128, 128),
                           spacing: Sequence[float] = (1.0, 0.7, 0.7),
                           lung_spacing: Sequence[float] = (2.5, 1.5, 1.5), **phantom_args: Any) -> list[Case]:
    """``synthetic-vessels``: the SYNTHETIC vessel phantom (binary label), deterministic per ``seed``.

    Args:
        seed: phantom seed.
        in_lungs: draw the tree inside CTChest4's lungs: the CT (linear) and lung mask (nearest) are
            resampled to ``lung_spacing`` ``(K, J, I)`` mm and cropped to the lungs plus 3 voxels; the tree is
            confined to the lungs and blended into the real CT (whose own vessels stay unlabelled).
        shape, spacing: ``(K, J, I)`` grid of the stand-alone phantom (ignored with ``in_lungs``).
        phantom_args: passed to :func:`~mismatch.benchmark.phantom.vessel_phantom` (e.g. ``n_roots``).
    """
    from .phantom import vessel_phantom

    if not in_lungs:
        image, label, info = vessel_phantom(shape=shape, spacing=spacing, seed=seed, **phantom_args)
        sp = tuple(float(s) for s in spacing)
        geom = Geometry(tuple(int(s) for s in image.shape[::-1]), sp[::-1], (0.0, 0.0, 0.0),
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        name = "synthetic-vessels"
    else:
        ct_r, mask_r, geom = _ctchest_lungs_resampled(lung_spacing)
        # The lungs are thin and the grid coarse (the thinnest tube is sqrt(3)/2 * 2.5 mm): shorter, more
        # persistent tubes and three roots give trees of 3 to 4 generations.
        for key, value in (("root_radius_mm", 4.0), ("length_factor", (3.0, 6.0)), ("max_tries", 30),
                           ("n_roots", 3)):
            phantom_args.setdefault(key, value)
        image, label, info = vessel_phantom(spacing=lung_spacing, seed=seed, background=ct_r, mask=mask_r,
                                            **phantom_args)
        name = "synthetic-vessels-lung"
    info = {k: v for k, v in info.items() if k != "occupancy"}
    return [Case(name, image[None].astype(np.float32), label.astype(np.uint8), geom, axis=0, window=CT_WINDOW,
                 classes={1: "vessel (synthetic)"}, synthetic=True,
                 source="SYNTHETIC vessel phantom (mismatch.benchmark.phantom)"
                        + (" inside slicerio CTChest4's lungs" if in_lungs else ""),
                 extra={"phantom": info})]


def load_synthetic_lesion(seed: int = 0, lung_spacing: Sequence[float] = (2.5, 1.5, 1.5),
                          name: str = "synthetic-lesion-lung", **phantom_args: Any) -> list[Case]:
    """``synthetic-lesion-lung``: a SYNTHETIC lobulated soft-tissue lesion (a stand-in for a lung tumour, which
    no installable package ships with a label) in CTChest4's lungs resampled to ``lung_spacing`` mm and
    cropped to the lungs as for ``synthetic-vessels-lung``; it reaches the pleura, where the chest wall has
    its intensities (:func:`~mismatch.benchmark.phantom.lesion_phantom`). Binary, deterministic per ``seed``.
    """
    from .phantom import lesion_phantom

    ct_r, mask_r, geom = _ctchest_lungs_resampled(lung_spacing)
    image, label, info = lesion_phantom(ct_r, mask_r, lung_spacing, seed=seed, **phantom_args)
    return [Case(name, image[None].astype(np.float32), label.astype(np.uint8), geom, axis=0,
                 window=CT_WINDOW, classes={1: "lesion (synthetic)"}, synthetic=True,
                 source="SYNTHETIC lesion phantom (mismatch.benchmark.phantom) inside slicerio CTChest4's lungs",
                 extra={"phantom": info})]


#: data set name -> loader(**options) -> list[Case]
DATASETS: dict[str, Callable[..., list[Case]]] = {
    "ctchest-lungs": load_ctchest_lungs,
    "ctchest-lungs-lr": load_ctchest_lungs_lr,
    "ctchest-spine": load_ctchest_spine,
    "ctchest-ribs": load_ctchest_ribs,
    "ctchest-lungs-spine-ribs": load_ctchest_lungs_spine_ribs,
    "ctchest-tissue": load_ctchest_tissue,
    "mni152-gm": load_mni152_gm,
    "mni152-wm": partial(load_mni152_gm, tissue="wm"),
    "mni152-tissue": partial(load_mni152_gm, tissue="both"),
    "mni152-csf": partial(load_mni152_gm, tissue="csf"),
    "pyradiomics-brain1": load_pyradiomics_brain1,
    "pyradiomics-breast1": load_pyradiomics_breast1,
    "synthetic-vessels": load_synthetic_vessels,
    "synthetic-vessels-lung": lambda **kw: load_synthetic_vessels(in_lungs=True, **kw),
    "synthetic-lesion-lung": load_synthetic_lesion,
    "synthetic-lesion-lung-fine": partial(load_synthetic_lesion, lung_spacing=(2.5, 0.75, 0.75),
                                          name="synthetic-lesion-lung-fine"),
}


#: data sets given as files (``--files IMAGE LABELS``) are named with this prefix (:func:`files_datasets`)
FILES_PREFIX = "file-"


def files_datasets(pairs: Sequence[Sequence[str]], axis: str = "k") -> dict[str, dict]:
    """``{data set name: options}`` for ``--files IMAGE LABELS`` pairs: ``file-<image file name>`` (``-2``,
    ``-3`` ... where two images share a name; ``-axis-j`` / ``-axis-i`` added when sliced along ``axis`` j or
    i, so that runs along two axes never pass for each other in one results folder), options for
    :func:`load_files`."""
    from ..io import _extension

    out: dict[str, dict] = {}
    suffix = "" if axis == "k" else f"-axis-{axis}"
    for image, labels in pairs:
        stem = Path(image).name
        stem = stem[: len(stem) - len(_extension(stem))]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
        name, n = FILES_PREFIX + stem + suffix, 2
        while name in out:
            name, n = f"{FILES_PREFIX}{stem}-{n}{suffix}", n + 1
        out[name] = {"image": str(image), "labels": str(labels), **({"axis": axis} if suffix else {})}
    return out


def load_files(image: str, labels: str, name: str = FILES_PREFIX + "image", axis: str = "k", **_: Any) -> list[Case]:
    """A volume of one's own with a label on every slice of the structure (``--files IMAGE LABELS``): the image
    as ``mismatch train`` reads it (a CT in Hounsfield units gets the CT window, as ``--hu-window auto``
    gives it), the label map on its grid, each label value a class. Slices along ``axis`` (k, j or i of the
    image grid; ``--axis``)."""
    from ..classes import remap_labels
    from ..data import auto_window, axis_index
    from ..io import read_image, read_labels

    ax = axis_index(axis)   # a bad name is an error before any file is read
    img, geometry = read_image(image)
    lab = read_labels(labels, geometry)
    values = [int(v) for v in label_values(lab) if v != 0]
    if not values:
        raise UserError(f"{labels}: the label map is empty (all zero); the benchmark needs the structure labelled "
                        "on every slice it is on")
    if len(values) > 255:
        raise UserError(f"{labels}: {len(values)} label values; the benchmark takes at most 255 classes")
    classes = remap_labels(lab, [{"value": v} for v in values]).astype(np.uint8, copy=False)
    return [Case(name, img, classes, geometry, axis=ax, window=auto_window(img),
                 classes={i: f"label {v}" for i, v in enumerate(values, start=1)},
                 source=f"{Path(image).name} with the labels of {Path(labels).name} (--files)")]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options: Any) -> list[Case]:
    """The cases of data set ``name`` (see :data:`DATASETS`, and :func:`files_datasets` for files given with
    ``--files``, whose ``options`` name them); ``data_dir`` for data found in a cache folder."""
    if name.startswith(FILES_PREFIX):
        if "image" not in options or "labels" not in options:
            raise UserError(f"data set {name}: give its files with --files IMAGE LABELS")
        return load_files(name=name, **options)
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name.startswith("pyradiomics-"):
        options["data_dir"] = data_dir
    return DATASETS[name](**options)


#: how the labelled slices of a benchmark draw are placed (``--placement``)
PLACEMENTS = ("random", "even")


def extent(label: np.ndarray, axis: int, min_fraction: float = 0.1) -> np.ndarray:
    """The slices where the structure is: cross-section at least ``min_fraction`` of the largest (the
    candidates :func:`draw_split` places labelled slices on). With several classes, the slices where any
    class has at least that fraction of its own largest cross-section: a small structure painted beside a
    large one (the spine beside the lungs) keeps its own extent, as a user covering every structure paints."""
    label = np.asarray(label)
    other = tuple(a for a in range(label.ndim) if a != axis)
    values = [v for v in label_values(label) if v != 0]
    if not values:
        raise UserError("the label map is empty: nothing to draw labelled slices from")
    found = np.zeros(label.shape[axis], dtype=bool)
    for v in values:
        counts = (label == v).sum(axis=other)
        found |= counts >= max(1.0, min_fraction * counts.max())
    return np.flatnonzero(found)


def even_slices(candidates: Sequence[int], n: int, n_slices: int) -> list[int]:
    """``n`` slices evenly spaced over ``[min(candidates), max(candidates)]``: the centres of ``n`` equal parts
    (one part: the middle slice). Where the extent holds fewer than ``n`` slices it is widened on both sides
    (within the volume)."""
    lo, hi = int(min(candidates)), int(max(candidates))
    while hi - lo + 1 < n and (lo > 0 or hi < n_slices - 1):
        lo, hi = max(0, lo - 1), min(n_slices - 1, hi + 1)
    if hi - lo + 1 <= n:
        return list(range(lo, hi + 1))[:n]
    length = hi - lo + 1
    chosen: list[int] = []
    for i in range(n):
        target = lo + (i + 0.5) * length / n - 0.5
        free = [s for s in range(lo, hi + 1) if s not in chosen]
        chosen.append(min(free, key=lambda s: (abs(s - target), s)))
    return sorted(chosen)


def draw_split(label: np.ndarray, axis: int, n_labelled: int, seed: int, n_test: int | None = None,
               min_fraction: float = 0.1, min_gap: int = 2,
               placement: str = "random") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw labelled, unlabelled and test slices of one case, deterministically from ``seed``.

    Labelled slices are placed on the slices with "enough" foreground (at least ``min_fraction`` of the
    largest per-slice foreground count, :func:`extent`):

    - ``placement="random"``: drawn at random there, at least ``min_gap`` slices apart when possible
      (``min_gap=2`` leaves one slice between labelled slices, as Slicer's Fill between slices asks its
      users; the gap is relaxed, closest-first, only if the candidates cannot hold ``n_labelled`` slices
      otherwise); each seed draws other slices.
    - ``placement="even"``: evenly spaced over the extent (:func:`even_slices`), what the product advises a
      user to paint first; the same slices for every seed (the seed then varies the training alone).

    Unlabelled = every slice not labelled (the Slicer use case: the rest of the same volume). Test = every
    unlabelled slice, with or without foreground (a prediction on a slice without the structure is a false
    positive and must count), or ``n_test`` of them drawn at random.

    Args:
        label: int ``[K, J, I]`` (any non-zero value is foreground).
        axis: numpy axis of the slices.
        n_labelled: number of labelled slices.
        seed: random seed (``numpy.random.default_rng``).
        n_test: number of test slices, drawn at random among the unlabelled ones (None = every unlabelled
            slice).
        placement: ``"random"`` or ``"even"`` (:data:`PLACEMENTS`).

    Returns:
        ``(labelled_idx, unlabelled_idx, test_idx)``: sorted int64 arrays of slice indices along ``axis``;
        labelled and test are disjoint, test is unlabelled (or a subset of it with ``n_test``).
    """
    if placement not in PLACEMENTS:
        raise UserError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    label = np.asarray(label)
    candidates = extent(label, axis, min_fraction)
    if n_labelled < 1 or n_labelled > len(candidates):
        raise UserError(f"cannot draw {n_labelled} labelled slices: only {len(candidates)} slices along the slice "
                        "axis have enough foreground (at least a tenth of the largest cross-section); ask for fewer "
                        "(--labelled), or slice a volume of your own along another axis (--axis j or i)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(candidates)   # drawn for both placements: n_test's draw comes after it
    if placement == "even":
        chosen = even_slices(candidates, n_labelled, label.shape[axis])
    else:
        chosen = []
        for gap in range(max(min_gap, 1), 0, -1):
            for s in order:
                if len(chosen) == n_labelled:
                    break
                if s not in chosen and all(abs(int(s) - c) >= gap for c in chosen):
                    chosen.append(int(s))
            if len(chosen) == n_labelled:
                break
    labelled = np.sort(np.asarray(chosen, dtype=np.int64))
    all_slices = np.arange(label.shape[axis], dtype=np.int64)
    unlabelled = np.setdiff1d(all_slices, labelled)
    test = unlabelled.copy()
    if n_test is not None and n_test < len(test):
        test = np.sort(rng.choice(test, size=n_test, replace=False)).astype(np.int64)
    return labelled, unlabelled, test
