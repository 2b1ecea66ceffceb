"""Per-case caches shared by dataset rendering, reward rollouts and evaluation.

A VRS dataset on disk only names cases (``cases.json``: case id -> how to load it).  `VolumeStore`
loads a case's volume and label channels on first use and keeps a few (LRU), renders slice views
keyed by (case, slices, size, window) so the 8 rollouts of a GRPO group (trl repeats each prompt
row) render once, and keeps one frozen propagator prepared per case so every rollout's coherence
reward reuses the same image features.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..volume import Volume, atomic_write

SAMPLE_CT_CASE = "sample_ct"


@dataclass(frozen=True)
class CaseSource:
    """How to load one case: the embedded sample CT, an M3D-Seg case folder, image + label map files, or a raw
    CT-ORG NIfTI pair prepared as the release does (`release_data`)."""

    case_id: str
    kind: str  # "sample_ct" | "m3d" | "files" | "ctorg_nifti"
    image: Optional[str] = None  # m3d: case folder; files: scan path
    labels: Optional[str] = None  # m3d: mask npz; files: label map path
    label_names: dict[str, str] = field(default_factory=dict)  # files: value -> name
    orientation: Optional[str] = None  # m3d only
    dataset: str = ""  # "sample", "0003", ... (evaluation groups by it)
    resize: int = 0  # ctorg_nifti: slices resized to resize x resize (the release: 512); 0 keeps them

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CaseSource":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class LoadedCase:
    """A case in memory: the volume and its ground-truth label map (int32 (K, J, I)) with value -> name."""

    source: CaseSource
    volume: Volume
    label_map: np.ndarray
    label_names: dict[int, str]
    notes: dict = field(default_factory=dict)  # how the reader interpreted the files (M3D-Seg: axial axis and why)
    spacing_known: bool = True  # False for M3D-Seg arrays (no voxel size stored): distances are then in voxels
    _instances: dict = field(default_factory=dict, repr=False)  # instance value -> mask, computed once

    @property
    def distance_unit(self) -> str:
        return "mm" if self.spacing_known else "voxels"

    def target_mask(self, labels: Sequence[int]) -> np.ndarray:
        """Union of label values (a target like 'kidneys' is kidney_right + kidney_left); an instance value
        (`kits_lesions.instance_value`: one KiTS23 tumour or cyst) stands for that connected lesion alone."""
        from ..kits_lesions import decode_instance, instance_mask

        plain = [int(v) for v in labels if decode_instance(v) is None]
        mask = np.isin(self.label_map, np.asarray(plain, dtype=self.label_map.dtype))
        for value in (int(v) for v in labels if decode_instance(v) is not None):
            if value not in self._instances:
                self._instances[value] = instance_mask(self.label_map, value)
            mask |= self._instances[value]
        return mask

    def label_name(self, value: int) -> str:
        """'kidney_tumor' for a channel value, 'kidney_tumor#2' for instance 2 of it."""
        from ..kits_lesions import decode_instance

        decoded = decode_instance(value)
        if decoded is None:
            return self.label_names.get(int(value), str(value))
        return f"{self.label_names.get(decoded[0], str(decoded[0]))}#{decoded[1]}"


def load_case(source: CaseSource) -> LoadedCase:
    """Read a case from disk (DataError / VolumeError naming it when unusable)."""
    if source.kind == SAMPLE_CT_CASE:
        from ..sample_data import fetch_sample
        from ..readers import load_label_map, load_volume

        sample = fetch_sample()
        volume = load_volume(sample.ct_path)
        labels = load_label_map(sample.labels_path, volume)
        return LoadedCase(source, volume, labels, {int(v): str(n) for v, n in sample.label_names.items()})
    if source.kind == "m3d":
        from ..m3d import load_m3d_case

        case = load_m3d_case(source.image, orientation=source.orientation, label_path=source.labels)
        # one-hot channels -> label map, channel c = label c + 1 (the published convention)
        label_map = np.zeros(case.volume.shape, dtype=np.int32)
        for c in range(case.masks.shape[0]):
            label_map[case.masks[c]] = c + 1
        return LoadedCase(source, case.volume, label_map, {c + 1: n for c, n in enumerate(case.label_names)}, case.axes.as_dict(),
                          spacing_known=False)
    if source.kind == "ctorg_nifti":
        from ..release_data import CTORG_LABELS, load_ctorg_case

        volume, labels = load_ctorg_case(source.image, source.labels, size=source.resize or 0, name=source.case_id.replace("/", "_"))
        return LoadedCase(source, volume, labels, {c + 1: n for c, n in enumerate(CTORG_LABELS)})
    if source.kind == "files":
        from ..readers import load_label_map, load_volume

        volume = load_volume(source.image)
        labels = load_label_map(source.labels, volume)
        return LoadedCase(source, volume, labels, {int(v): str(n) for v, n in source.label_names.items()})
    raise DataError(f"case {source.case_id}: unknown source kind {source.kind!r}")


def write_cases(path: str | os.PathLike, sources: Sequence[CaseSource]) -> Path:
    payload = {s.case_id: s.to_dict() for s in sources}
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))


def read_cases(path: str | os.PathLike) -> dict[str, CaseSource]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: case list not found (run Training/prepare_data.py first)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return {cid: CaseSource.from_dict(d) for cid, d in raw.items()}


class VolumeStore:
    """Case id -> loaded case, rendered views and a prepared propagator; small LRU, thread-safe."""

    def __init__(
        self,
        sources: dict[str, CaseSource],
        *,
        max_cases: int = 4,
        max_views: int = 64,
        propagator_factory: Optional[Callable[[], object]] = None,
    ):
        self.sources = dict(sources)
        self.max_cases = max_cases
        self.max_views = max_views
        self.propagator_factory = propagator_factory
        self._cases: "OrderedDict[str, LoadedCase]" = OrderedDict()
        self._views: "OrderedDict[tuple, object]" = OrderedDict()
        self._propagator = None
        self._prepared_for: Optional[str] = None
        self._lock = threading.RLock()
        self.stats = {"case_loads": 0, "view_renders": 0, "view_hits": 0, "propagator_prepares": 0}

    @classmethod
    def from_dir(cls, data_dir: str | os.PathLike, **kwargs) -> "VolumeStore":
        return cls(read_cases(Path(data_dir) / "cases.json"), **kwargs)

    def case(self, case_id: str) -> LoadedCase:
        with self._lock:
            if case_id in self._cases:
                self._cases.move_to_end(case_id)
                return self._cases[case_id]
            if case_id not in self.sources:
                raise DataError(f"case {case_id!r} is not in the case list ({len(self.sources)} cases)")
            loaded = load_case(self.sources[case_id])
            self.stats["case_loads"] += 1
            self._cases[case_id] = loaded
            while len(self._cases) > self.max_cases:
                self._cases.popitem(last=False)
            return loaded

    def volume(self, case_id: str) -> Volume:
        return self.case(case_id).volume

    def views(self, case_id: str, slices: Sequence[int], image_size: int, window=None, *, blank: bool = False):
        """Rendered SliceViews for exactly these slices (cached); `blank` gives black images (control)."""
        from ..views import render_views

        key = (case_id, tuple(int(s) for s in slices), int(image_size), str(window), bool(blank))
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                self.stats["view_hits"] += 1
                return self._views[key]
            views = render_views(self.volume(case_id), key[1], image_size=image_size, window=window)
            if blank:
                views.images = [np.zeros_like(image) for image in views.images]
            self.stats["view_renders"] += 1
            self._views[key] = views
            while len(self._views) > self.max_views:
                self._views.popitem(last=False)
            return views

    def propagator(self, case_id: str):
        """The one frozen propagator, prepared on this case.

        `prepare` is free for the volume it already holds (features cached by fingerprint), so the
        rollouts of a GRPO group, which all share one case, encode the volume once.
        """
        if self.propagator_factory is None:
            raise DataError("this store has no propagator: pass propagator_factory to VolumeStore")
        with self._lock:
            if self._propagator is None:
                self._propagator = self.propagator_factory()
            volume = self.volume(case_id)
            if self._prepared_for != volume.fingerprint:
                self._propagator.prepare(volume)
                self._prepared_for = volume.fingerprint
                self.stats["propagator_prepares"] += 1
            return self._propagator

    def resolve(self, case_id: str, labels: Sequence[int]) -> tuple[Volume, np.ndarray]:
        """`rewards.Resolver`: (volume, GT mask) of the case for these label values."""
        case = self.case(case_id)
        return case.volume, case.target_mask(labels)
