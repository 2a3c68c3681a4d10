"""measurements/export_dataset.py: a benchmark data set written as files reads back as ``--files`` reads it."""

import numpy as np
import pytest
from measurement_scripts import load_script


def _script():
    return load_script("export_dataset")


def test_exported_data_set_reads_back_as_files_along_another_axis(tmp_path):
    pytest.importorskip("slicerio")
    from mismatch.benchmark.datasets import files_datasets, load_dataset

    assert _script().main(["ctchest-spine", "--out", str(tmp_path)]) == 0
    case = load_dataset("ctchest-spine")[0]
    (name, options), = files_datasets([(tmp_path / "ctchest-spine.nrrd", tmp_path / "ctchest-spine-label.nrrd")],
                                      axis="i").items()
    assert name == "file-ctchest-spine-axis-i"
    back = load_dataset(name, **options)[0]
    assert back.axis == 2 and np.array_equal(back.label, case.label)
    np.testing.assert_allclose(back.image[0], case.image[0], atol=1e-3)
    assert back.geometry.spacing == pytest.approx(case.geometry.spacing)


def test_an_unknown_data_set_is_one_clear_error(tmp_path, capsys):
    assert _script().main(["no-such-set", "--out", str(tmp_path)]) == 2
    assert "unknown data set" in capsys.readouterr().err
