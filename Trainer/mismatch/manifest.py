"""Unlabelled pools too large for memory: volumes listed in a manifest, read lazily, a slice at a time.

    mismatch train CT.nrrd --labels L.nrrd --out MODEL --unlabelled-manifest pool.csv --cache-volumes 8

The manifest (relative paths are relative to the manifest's folder):

- CSV with a header: the column ``path`` holds the volume (more channels: more columns whose names start with
  ``path`` or ``channel``, in order, e.g. ``path,path_t2``; other columns such as ``id`` are ignored);
- CSV without a header: one volume per line, its channels comma-separated;
- JSON: a list of paths, or a list of lists of channel paths.

Blank lines and lines starting with ``#`` are skipped. Every file's header is read when the manifest is
opened (missing files, wrong dimensions, channel counts and grids are a :class:`UserError` before training
starts); pixels are read only when a slice is drawn:

- raw (uncompressed) NRRD: the slice is read through a memory map of the file (SimpleITK's NRRD reader
  cannot stream: it would read the whole file for one slice);
- NIfTI (``.nii``, ``.nii.gz``) and MetaImage (``.mha``, ``.mhd``): SimpleITK's ``ImageFileReader`` with
  ``SetExtractIndex`` / ``SetExtractSize``, which streams these formats (only the slice is decoded; a
  gzipped NIfTI is decompressed up to the slice);
- compressed NRRD: cannot be streamed; the whole volume is read once and held like a cached volume.

Normalisation: per volume and channel, the z-score of :class:`~mismatch.data.Normalisation` (after the
``--hu-window`` clip), with the mean and standard deviation estimated once, when the volume is first used,
from up to :data:`STAT_SLICES` slices evenly spaced along K (all of them for a smaller volume, which then
gives exactly ``Normalisation.apply``); only these two numbers per channel are kept. NaN / infinite voxels
become 0 (the volume's mean) with a warning, rather than stopping a long training run.

Memory: :class:`VolumeCache` keeps the normalised slices read so far, grouped by volume, least recently used
volume evicted first, holding at most ``max_volumes`` volumes and ``max_bytes`` bytes (a compressed NRRD
larger than ``max_bytes`` alone is the one exception: it is held alone while it is used).

The volumes' grids need not match the labelled case's: like ``--unlabelled`` volumes, their slices are
cropped to the training patch at random positions and padded where smaller (or, with ``--patch-size 0``,
padded to the batch's largest slice); nothing is resampled. Only the channel count must match.
"""

from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .data import axis_index, centre_channel, intensity_window
from .errors import UserError
from .io import SUPPORTED_EXTENSIONS, Geometry, _extension

#: slices (evenly spaced along K) from which a volume's normalisation is estimated
STAT_SLICES = 16


# -- the manifest file -----------------------------------------------------------------------------------

def _looks_like_path(cell: str) -> bool:
    return _extension(cell.strip()) in SUPPORTED_EXTENSIONS


def _is_channel_column(name: str) -> bool:
    name = name.strip().lower()
    return name.startswith("path") or name.startswith("channel")


def read_manifest(path: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """The manifest's volumes: ``[(where, [channel paths])]``, ``where`` naming the line or entry for messages.

    Paths are resolved against the manifest's folder; their existence is checked by :meth:`ManifestPool.open`.
    """
    mpath = Path(path)
    if not mpath.is_file():
        raise UserError(f"{path}: unlabelled manifest not found" + (" (it is a folder)" if mpath.is_dir() else "")
                        + "; give a CSV or JSON file listing the volumes")
    try:
        text = mpath.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc}); give a UTF-8 CSV or JSON file") from None
    base = mpath.resolve().parent
    entries: list[tuple[str, list[str]]] = []
    if mpath.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); give a list of paths or of lists of channel "
                            "paths") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of paths, or of lists of channel paths "
                            '(["a.nrrd", "b.nii.gz"] or [["a_t1.nrrd", "a_t2.nrrd"], ...])')
        for n, item in enumerate(data, start=1):
            channels = [item] if isinstance(item, str) else item
            if not isinstance(channels, list) or not channels or not all(isinstance(c, str) and c.strip()
                                                                          for c in channels):
                raise UserError(f"{path}: entry {n} is {json.dumps(item)[:60]}, not a path or a list of "
                                "channel paths")
            entries.append((f"entry {n}", channels))
    else:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
                 if line.strip() and not line.lstrip().startswith("#")]
        rows = [(n, [c.strip() for c in row]) for (n, line) in lines for row in csv.reader([line])]
        columns = None
        if rows and not any(_looks_like_path(c) for c in rows[0][1]):
            header = rows[0][1]
            columns = [i for i, name in enumerate(header) if _is_channel_column(name)]
            if not columns:
                raise UserError(f"{path}: the CSV header ({', '.join(header)[:80]}) has no 'path' column; name "
                                "the column holding the volumes 'path' (more channels: path2, ...), or list one "
                                "path per line without a header")
            rows = rows[1:]
        for n, cells in rows:
            channels = [cells[i] for i in columns if i < len(cells)] if columns is not None else cells
            channels = [c for c in channels if c]
            if not channels:
                raise UserError(f"{path}: line {n} has no path; give one volume per line")
            entries.append((f"line {n}", channels))
    if not entries:
        raise UserError(f"{path}: the manifest lists no volumes; give one path per line (CSV) or a JSON list of "
                        "paths")
    out = []
    for where, channels in entries:
        resolved = []
        for c in channels:
            p = Path(os.path.expanduser(c))
            resolved.append(p if p.is_absolute() else base / p)
        out.append((where, resolved))
    return out


# -- reading slices --------------------------------------------------------------------------------------

_NRRD_TYPES = {
    **dict.fromkeys(["signed char", "int8", "int8_t"], "i1"),
    **dict.fromkeys(["uchar", "unsigned char", "uint8", "uint8_t"], "u1"),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16", "int16_t"], "i2"),
    **dict.fromkeys(["ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"], "u2"),
    **dict.fromkeys(["int", "signed int", "int32", "int32_t"], "i4"),
    **dict.fromkeys(["uint", "unsigned int", "uint32", "uint32_t"], "u4"),
    **dict.fromkeys(["longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t"], "i8"),
    **dict.fromkeys(["ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"], "u8"),
    "float": "f4", "double": "f8",
}


def nrrd_raw_layout(path: str | os.PathLike) -> tuple[Path, int, np.dtype, tuple[int, int, int]] | None:
    """Where a raw-encoded 3D NRRD keeps its voxels: ``(data file, byte offset, dtype, (K, J, I))``.

    None when the file is not a plain raw 3D NRRD (compressed, a list of data files, line skips...): then it
    cannot be memory-mapped and is read by SimpleITK instead.
    """
    path = Path(path)
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if not f.readline().startswith(b"NRRD"):
                return None
            while True:
                line = f.readline()
                if not line or not line.strip():
                    break
                text = line.decode("latin-1").rstrip("\r\n")
                key, sep, value = text.partition(":")
                if text.startswith("#") or not sep or value.startswith("="):   # comments, key:=value pairs
                    continue
                fields[key.strip().lower()] = value.strip()
            header_end = f.tell()
    except OSError:
        return None
    dtype = _NRRD_TYPES.get(fields.get("type", "").lower())
    if dtype is None or fields.get("encoding", "").lower() != "raw" or fields.get("dimension") != "3":
        return None
    if int(fields.get("line skip", "0") or 0) != 0:
        return None
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        skip = int(fields.get("byte skip", "0") or 0)
    except (KeyError, ValueError):
        return None
    if len(sizes) != 3:
        return None
    order = "<" if fields.get("endian", "little").lower() == "little" else ">"
    dt = np.dtype(order + dtype if dtype[1] != "1" else dtype)
    nbytes = int(np.prod(sizes)) * dt.itemsize
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) != 1:
            return None
        data = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
        offset = 0
    else:
        data, offset = path, header_end
    try:
        size = data.stat().st_size
    except OSError:
        return None
    offset = size - nbytes if skip == -1 else offset + skip
    if offset < 0 or offset + nbytes > size:
        return None
    return data, offset, dt, (sizes[2], sizes[1], sizes[0])


class VolumeSource:
    """The files of one manifest volume (one per channel) and how to read them; reads raw (stored) values.

    Built from the headers only (:meth:`open`); ``shape`` is ``(C, K, J, I)``; ``mode`` is ``"memmap"``
    (raw NRRD), ``"stream"`` (SimpleITK streaming) or ``"whole"`` (read the whole file).
    """

    def __init__(self, paths: list[Path], shape: tuple[int, int, int, int], mode: str, layouts: list | None,
                 where: str = ""):
        self.paths, self.shape, self.mode, self.layouts, self.where = paths, shape, mode, layouts, where

    @classmethod
    def open(cls, paths: Sequence[Path], manifest: str = "", where: str = "") -> "VolumeSource":
        label = f"{manifest}: {where}: " if manifest else ""
        geometry, first = None, None
        for p in paths:
            if not p.exists():
                raise UserError(f"{label}{p}: file not found; fix the path (relative paths are relative to the "
                                "manifest's folder)")
            if p.is_dir():
                raise UserError(f"{label}{p}: is a folder; list image files")
            if _extension(p) not in SUPPORTED_EXTENSIONS:
                raise UserError(f"{label}{p}: unsupported file type {_extension(p) or '(no extension)'}; use one "
                                f"of {', '.join(SUPPORTED_EXTENSIONS)}")
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            try:
                reader.ReadImageInformation()
            except RuntimeError as exc:
                lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
                reason = (lines[-1] if lines else "unknown reason")[:160]
                raise UserError(f"{label}{p}: cannot be read as an image ({reason})") from None
            dim, comps = reader.GetDimension(), reader.GetNumberOfComponents()
            if dim != 3 or comps != 1:
                what = f"a {dim}D image" if dim != 3 else f"an image with {comps} components per voxel"
                raise UserError(f"{label}{p}: is {what}; list 3D scalar volumes (one file per channel)")
            geo = Geometry(tuple(int(s) for s in reader.GetSize()), tuple(reader.GetSpacing()),
                           tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
            if geometry is None:
                geometry, first = geo, p
            elif not geometry.same_grid(geo):
                raise UserError(f"{label}the channels {first} and {p} are on different grids; resample every "
                                "channel onto the first one's grid")
        layouts = None
        ext = _extension(paths[0])
        if ext in (".nrrd", ".nhdr"):
            layouts = [nrrd_raw_layout(p) for p in paths]
            ok = all(lay is not None and lay[3] == geometry.shape for lay in layouts)
            mode = "memmap" if ok else "whole"
            layouts = layouts if ok else None
        else:
            mode = "stream"
        if any(_extension(p) in (".nrrd", ".nhdr") for p in paths) and mode == "stream":
            mode = "whole"  # a mix of formats: keep it simple and correct
        return cls(list(paths), (len(paths),) + geometry.shape, mode, layouts, where)

    def read_slice(self, ax: int, index: int) -> list[np.ndarray]:
        """Slice ``index`` along numpy axis ``ax`` (0 = K, 1 = J, 2 = I) of every channel, as stored."""
        out = []
        for c, p in enumerate(self.paths):
            if self.mode == "memmap":
                data, offset, dtype, shape = self.layouts[c]
                mm = np.memmap(data, dtype=dtype, mode="r", offset=offset, shape=shape)
                out.append(np.array(mm[(slice(None),) * ax + (int(index),)]))   # copies one slice
                del mm
            else:
                d = 2 - ax                    # SimpleITK's index order is (I, J, K)
                size = [self.shape[3], self.shape[2], self.shape[1]]
                start = [0, 0, 0]
                start[d], size[d] = int(index), 1   # size 1, not 0: no direction collapse for oblique grids
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(p))
                reader.SetExtractIndex(start)
                reader.SetExtractSize(size)
                out.append(np.squeeze(sitk.GetArrayFromImage(reader.Execute()), axis=ax))
        return out

    def read_whole(self) -> list[np.ndarray]:
        """Every channel as a ``[K, J, I]`` array, as stored."""
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in self.paths]


# -- the cache -------------------------------------------------------------------------------------------

class VolumeCache:
    """Least-recently-used store of what has been read, grouped by volume.

    Holds at most ``max_volumes`` volumes and ``max_bytes`` bytes (None: no byte bound). A volume's entry
    holds its normalised slices read so far (``put_slice``) or its whole stored arrays (``put_whole``).
    ``peak_volumes`` / ``peak_bytes`` record the most ever held; ``volume_loads`` counts entries created,
    ``reads`` slices read from disk, ``hits`` slices served from memory.
    """

    def __init__(self, max_volumes: int = 8, max_bytes: int | None = None):
        if max_volumes < 1:
            raise UserError(f"--cache-volumes {max_volumes}: hold at least one volume")
        self.max_volumes = int(max_volumes)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._entries: OrderedDict[int, dict] = OrderedDict()
        self.bytes = 0
        self.peak_volumes = self.peak_bytes = 0
        self.volume_loads = self.reads = self.hits = 0

    @property
    def volumes(self) -> int:
        """Volumes held now."""
        return len(self._entries)

    def held(self) -> list[int]:
        return list(self._entries)

    def _fits(self, nbytes: int) -> bool:
        return self.max_bytes is None or self.bytes + nbytes <= self.max_bytes

    def _evict_one(self, keep: int | None) -> bool:
        for vid in self._entries:
            if vid != keep:
                self.bytes -= self._entries.pop(vid)["bytes"]
                return True
        return False

    def _entry(self, vid: int, nbytes: int) -> dict:
        """The entry of ``vid`` (most recently used now), room made for ``nbytes`` more."""
        entry = self._entries.get(vid)
        if entry is None:
            while self._entries and (len(self._entries) >= self.max_volumes or not self._fits(nbytes)):
                self._evict_one(keep=None)
            entry = self._entries[vid] = {"slices": OrderedDict(), "whole": None, "bytes": 0}
            self.volume_loads += 1
        else:
            self._entries.move_to_end(vid)
            while not self._fits(nbytes) and self._evict_one(keep=vid):
                pass
            while not self._fits(nbytes) and entry["slices"]:
                _, old = entry["slices"].popitem(last=False)
                entry["bytes"] -= old.nbytes
                self.bytes -= old.nbytes
        return entry

    def _account(self) -> None:
        self.peak_volumes = max(self.peak_volumes, len(self._entries))
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def get_slice(self, vid: int, key) -> np.ndarray | None:
        entry = self._entries.get(vid)
        if entry is None or key not in entry["slices"]:
            return None
        self._entries.move_to_end(vid)
        entry["slices"].move_to_end(key)
        self.hits += 1
        return entry["slices"][key]

    def put_slice(self, vid: int, key, array: np.ndarray) -> None:
        if self.max_bytes is not None and array.nbytes > self.max_bytes:
            return
        entry = self._entry(vid, array.nbytes)
        entry["slices"][key] = array
        entry["bytes"] += array.nbytes
        self.bytes += array.nbytes
        self._account()

    def get_whole(self, vid: int) -> list[np.ndarray] | None:
        entry = self._entries.get(vid)
        if entry is None or entry["whole"] is None:
            return None
        self._entries.move_to_end(vid)
        return entry["whole"]

    def put_whole(self, vid: int, arrays: list[np.ndarray]) -> None:
        nbytes = sum(a.nbytes for a in arrays)
        entry = self._entry(vid, nbytes)
        self.bytes -= entry["bytes"]          # the whole volume replaces any slices of it
        entry.update(slices=OrderedDict(), whole=arrays, bytes=nbytes)
        self.bytes += nbytes
        self._account()

    def describe(self) -> str:
        mb = 2**20
        bound = "" if self.max_bytes is None else f" / {self.max_bytes / mb:.0f} MB"
        return (f"held at most {self.peak_volumes} of {self.max_volumes} volumes and {self.peak_bytes / mb:.1f} MB"
                f"{bound}; {self.volume_loads} volume load(s), {self.reads} slice(s) read, {self.hits} from memory")


# -- the lazy volume and the pool ------------------------------------------------------------------------

class LazyVolume:
    """A manifest volume that looks like the normalised ``float32 [C, K, J, I]`` array the sampler expects:
    ``shape``, ``ndim`` and ``volume[:, index]`` / ``volume[:, :, index]`` / ``volume[:, :, :, index]``
    (one slice, ``[C, H, W]``, read on demand). Nothing else of numpy's interface is offered, so that no code
    loads the whole volume by accident."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, pool: "ManifestPool", vid: int):
        self._pool, self._vid = pool, vid
        self.shape = pool.sources[vid].shape

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple) or not 2 <= len(key) <= 4 or not isinstance(key[-1], (int, np.integer)) \
                or any(k != slice(None) for k in key[:-1]):
            raise TypeError("a LazyVolume gives one slice: volume[:, k], volume[:, :, j] or volume[:, :, :, i]")
        ax = len(key) - 2
        index = int(key[-1])
        if not 0 <= index < self.shape[1 + ax]:
            raise IndexError(f"slice {index} is outside 0..{self.shape[1 + ax] - 1}")
        return self._pool.slice(self._vid, ax, index)

    def __repr__(self) -> str:
        return f"LazyVolume({', '.join(str(p) for p in self._pool.sources[self._vid].paths)}, shape={self.shape})"


class ManifestPool:
    """The volumes of a manifest, their normalisation statistics and the shared :class:`VolumeCache`.

    ``volumes``: one :class:`LazyVolume` per manifest entry, to append to the sampler's volumes.
    """

    def __init__(self, sources: list[VolumeSource], hu_window: tuple[float, float] | None = None,
                 cache: VolumeCache | None = None, warn: Callable[[str], None] | None = None):
        self.sources = sources
        self.hu_window = intensity_window(hu_window or None)
        self.cache = cache or VolumeCache()
        self.warn = warn or (lambda message: None)
        self._stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._warned: set[int] = set()
        self.volumes = [LazyVolume(self, i) for i in range(len(sources))]

    @classmethod
    def open(cls, manifest: str | os.PathLike, channels: int | None = None, axis: str = "k",
             hu_window=None, cache_volumes: int = 8, cache_bytes: int | None = None,
             warn: Callable[[str], None] | None = None, check_not: Sequence = ()) -> "ManifestPool":
        """Read the manifest and every listed file's header (no pixels). ``channels``: the labelled case's
        channel count, which every volume must have."""
        from .io import check_outputs_not_inputs

        axis_index(axis)   # validates
        sources = []
        for where, paths in read_manifest(manifest):
            if channels is not None and len(paths) != channels:
                raise UserError(f"{manifest}: {where} lists {len(paths)} channel(s) but the labelled case has "
                                f"{channels}; list the same channels for every volume (CSV columns path, path2...)")
            sources.append(VolumeSource.open(paths, manifest=str(manifest), where=where))
        check_outputs_not_inputs(check_not, [p for s in sources for p in s.paths])
        return cls(sources, hu_window=hu_window, cache=VolumeCache(cache_volumes, cache_bytes), warn=warn)

    # -- reading --------------------------------------------------------------------------------------
    def _raw_slice(self, vid: int, ax: int, index: int) -> list[np.ndarray]:
        src = self.sources[vid]
        if src.mode == "whole":
            whole = self.cache.get_whole(vid)
            if whole is None:
                whole = src.read_whole()
                self.cache.put_whole(vid, whole)
            return [w[(slice(None),) * ax + (int(index),)] for w in whole]   # views
        self.cache.reads += 1
        return src.read_slice(ax, index)

    def _non_finite(self, vid: int, count: int) -> None:
        if vid not in self._warned:
            self._warned.add(vid)
            self.warn(f"{', '.join(str(p) for p in self.sources[vid].paths)}: {count} NaN or infinite voxel(s) "
                      "in the slices read so far; they are used as the volume's mean intensity")

    def stats(self, vid: int) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` per channel (float64 ``[C]``) of volume ``vid``, estimated once from up to
        :data:`STAT_SLICES` K-slices; ``std`` 0 marks a constant channel. The arithmetic of
        :meth:`mismatch.data.Normalisation.apply` (:func:`mismatch.data.centre_channel`) on the sampled slices."""
        if vid in self._stats:
            return self._stats[vid]
        src = self.sources[vid]
        k = src.shape[1]
        picks = np.unique(np.linspace(0, k - 1, min(k, STAT_SLICES)).round().astype(int))
        per_slice = [self._raw_slice(vid, 0, int(s)) for s in picks]
        means, stds = np.zeros(src.shape[0]), np.zeros(src.shape[0])
        for c in range(src.shape[0]):
            ch = np.empty((len(picks),) + per_slice[0][c].shape, dtype=np.float32)
            for i, sl in enumerate(per_slice):
                np.copyto(ch[i], sl[c], casting="unsafe")
            bad = ~np.isfinite(ch)
            if bad.any():
                self._non_finite(vid, int(bad.sum()))
                finite = ch[~bad]
                ch[bad] = np.float32(finite.mean(dtype=np.float64)) if finite.size else 0
            if self.hu_window is not None:
                np.clip(ch, self.hu_window[0], self.hu_window[1], out=ch)
            means[c], stds[c] = centre_channel(ch)
        self._stats[vid] = (means, stds)
        return self._stats[vid]

    def slice(self, vid: int, ax: int, index: int) -> np.ndarray:
        """Normalised ``float32 [C, H, W]`` slice ``index`` along numpy axis ``ax`` of volume ``vid``."""
        key = (ax, index)
        cached = self.cache.get_slice(vid, key)
        if cached is not None:
            return cached
        mean, std = self.stats(vid)
        raw = self._raw_slice(vid, ax, index)
        out = np.empty((len(raw),) + raw[0].shape, dtype=np.float32)
        for c, sl in enumerate(raw):
            ch = out[c]
            np.copyto(ch, sl, casting="unsafe")
            if self.hu_window is not None:
                np.clip(ch, self.hu_window[0], self.hu_window[1], out=ch)
            if std[c] > 0:
                ch -= np.float32(mean[c])
                ch *= np.float32(1.0 / std[c])
            else:
                ch[...] = 0
        bad = ~np.isfinite(out)
        if bad.any():
            self._non_finite(vid, int(bad.sum()))
            out[bad] = 0
        if self.sources[vid].mode != "whole":   # a whole volume is held already; its slices are cheap
            self.cache.put_slice(vid, key, out)
        return out
