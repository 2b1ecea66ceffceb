"""readers.py picks the reader by what the path is; volume.py no longer reaches back into the file readers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import MedVolR1Lib
from MedVolR1Lib.errors import VolumeError
from MedVolR1Lib.readers import check_fits_in_memory, nifti_nonfinite_codes, parse_bytes, scan_kind

LIB = Path(MedVolR1Lib.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every MedVolR1Lib module a file imports, at any depth of the file (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                names.update({module} if module else {alias.name for alias in node.names})
            elif module.startswith("MedVolR1Lib."):
                names.add(module.split(".", 1)[1])
    return names


def test_volume_and_m3d_no_longer_import_each_other():
    assert not {"m3d", "readers"} & _imported_modules(LIB / "volume.py")
    assert "readers" not in _imported_modules(LIB / "m3d.py")
    code = "import sys, MedVolR1Lib.volume; assert 'MedVolR1Lib.m3d' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_scan_kind_dispatch(tmp_path):
    case = tmp_path / "0003" / "case1"
    case.mkdir(parents=True)
    np.save(case / "image.npy", np.zeros((1, 4, 4, 4), np.float32))
    assert scan_kind(case) == scan_kind(case / "image.npy") == "m3d"
    assert scan_kind(tmp_path / "0003") == "dicom"
    assert scan_kind(tmp_path / "scan.nii.gz") == "image"


def test_memory_estimate_for_an_m3d_case_reads_only_the_header(tmp_path):
    case = tmp_path / "0003" / "case1"
    case.mkdir(parents=True)
    np.save(case / "image.npy", np.zeros((1, 10, 20, 30), np.float64))
    assert check_fits_in_memory(case, available=10**9).bytes == 6000 * (8 + 4)
    with pytest.raises(VolumeError, match=r"1x10x20x30 voxels: the file's 8-byte pixels plus a float32 copy"):
        check_fits_in_memory(case, available=1000)


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1e6") == 10**6
    with pytest.raises(ValueError, match="expected bytes"):
        parse_bytes("lots")


def test_nifti_without_nonfinite_voxels_gives_none(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "ok.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32)), str(path))
    assert nifti_nonfinite_codes(path) is None
    array = np.ones((3, 4, 5), np.float64)
    array[2, 1, 0], array[0, 3, 4] = np.nan, -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    codes = nifti_nonfinite_codes(path)
    assert codes.shape == (3, 4, 5) and codes[2, 1, 0] == 1 and codes[0, 3, 4] == 2 and np.count_nonzero(codes) == 2
