"""Write benchmark data sets as image and label files, to run them as ``--files`` (e.g. sliced along another axis).

    python measurements/export_dataset.py --out views mni152-gm pyradiomics-brain1 ctchest-spine
    mismatch benchmark --axis j --files views/mni152-gm.nrrd views/mni152-gm-label.nrrd ...

Each named data set (``mismatch benchmark --datasets``) is read as the benchmark reads it (the same crop,
block averaging and label) and written as ``OUT/NAME.nrrd`` (the image, its first channel, on the case's
grid: Hounsfield units for a CT, which ``--files`` windows as ``mismatch train`` does) and
``OUT/NAME-label.nrrd`` (the class indices on the same grid). A painter who works in the coronal or sagittal
view paints slices along ``j`` or ``i`` of such a file; the named data sets are sliced along their own axis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+", help="benchmark data set names (mismatch benchmark --datasets)")
    ap.add_argument("--out", required=True, help="folder for NAME.nrrd and NAME-label.nrrd")
    ap.add_argument("--data-dir", help="folder with data that no package installs (as mismatch benchmark's)")
    args = ap.parse_args(argv)

    import numpy as np

    from mismatch.benchmark.datasets import load_dataset
    from mismatch.errors import UserError
    from mismatch.io import write_volume

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        try:
            cases = load_dataset(name, data_dir=args.data_dir)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for n, case in enumerate(cases):
            stem = name if len(cases) == 1 else f"{name}-{n + 1}"
            write_volume(np.asarray(case.image[0], dtype=np.float32), case.geometry, out / f"{stem}.nrrd")
            write_volume(np.asarray(case.label, dtype=np.uint8), case.geometry, out / f"{stem}-label.nrrd")
            print(f"{out / stem}.nrrd, {stem}-label.nrrd: {case.label.shape[::-1]} (i, j, k), "
                  f"classes {case.classes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
