"""Evidence (several anchors, extent limits, points): validation refuses bad corrections, records round-trip."""

from __future__ import annotations

import pytest

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
from MedVolR1Lib.errors import AnchorError
from MedVolR1Lib.evidence import Evidence, EvidencePoint, parse_anchor_spec

SHAPE = (40, 64, 64)


def _anchor(k, *boxes):
    return EvidenceAnchor(k, tuple(VoxelBox(*b) for b in boxes))


def test_round_trip_and_coerce():
    evidence = Evidence((_anchor(10, (1, 2, 30, 40)), _anchor(20, (5, 5, 9, 9), (20, 20, 30, 30))), (3, 35),
                        (EvidencePoint(20, 7.0, 7.0, False),))
    assert Evidence.from_dict(evidence.to_dict()) == evidence.validate(SHAPE)
    assert Evidence.coerce(evidence.primary).anchors == (evidence.primary,)
    assert evidence.anchor_slices == (10, 20)


@pytest.mark.parametrize(
    "evidence, message",
    [
        (Evidence((_anchor(45, (1, 1, 5, 5)),)), "out of range"),
        (Evidence((_anchor(10, (1, 1, 5, 5)),), (30, 20)), "inverted"),
        (Evidence((_anchor(10, (1, 1, 5, 5)),), (0, 40)), "leaves the volume"),
        (Evidence((_anchor(10, (1, 1, 5, 5)),), (12, 30)), "outside the extent"),
        (Evidence((_anchor(10, (1, 1, 5, 5)),), None, (EvidencePoint(11, 2, 2),)), "no anchor"),
        (Evidence((_anchor(10, *[(1, 1, 5, 5)] * 9),)), "at most 8"),
        (Evidence((_anchor(10, (1, 1, 5, 5)), _anchor(10, (2, 2, 6, 6)))), "two anchors"),
        (Evidence(()), "no anchor"),
    ],
)
def test_bad_corrections_are_refused(evidence, message):
    with pytest.raises(AnchorError, match=message):
        evidence.validate(SHAPE)


def test_anchor_spec():
    assert parse_anchor_spec("81:103,211,176,296;297,226,364,292") == (81, ((103, 211, 176, 296), (297, 226, 364, 292)))
    for bad in ("81", "x:1,2,3,4", "81:1,2,3", "81:", "81:1,2,3,nan"):
        with pytest.raises(AnchorError):
            parse_anchor_spec(bad)
    with pytest.raises(AnchorError, match="malformed"):
        Evidence.from_dict({"anchors": [{"slice": 1}]})


def test_history_undo_restores_previous_version():
    import numpy as np

    from MedVolR1Lib.evidence_history import EvidenceHistory

    history = EvidenceHistory(limit=2)
    first = Evidence.single(_anchor(10, (1, 1, 5, 5)))
    second = Evidence((_anchor(10, (1, 1, 5, 5)), _anchor(20, (2, 2, 6, 6))))
    history.push(first, np.zeros(SHAPE, np.uint8))
    with pytest.raises(ValueError):
        history.undo()
    history.push(second, np.ones(SHAPE, np.uint8))
    restored = history.undo()
    assert restored.evidence == first and not restored.mask.any()
    history.push(second, np.ones(SHAPE, np.uint8))
    history.push(first, np.zeros(SHAPE, np.uint8))  # limit 2: the oldest version is dropped
    assert len(history) == 2 and history.undo().evidence == second


def test_history_keeps_masks_compressed_within_a_byte_budget():
    """Undo inside Slicer: masks are kept as packed bits + zlib and the history is bounded by bytes, so twenty
    versions of an organ mask no longer hold twenty full uint8 copies (2 GB for a 512x512x400 CT)."""
    import numpy as np

    from MedVolR1Lib.evidence_history import EvidenceHistory

    shape = (200, 256, 256)  # 13 MB as uint8

    def organ(n):
        mask = np.zeros(shape, np.uint8)
        mask[75 + n:125 + n, 100:150, 90:145] = 1
        return mask

    evidence = Evidence.single(_anchor(10, (1, 1, 5, 5)))
    history = EvidenceHistory(limit=20)
    for n in range(20):
        history.push(evidence, organ(n))
    assert len(history) == 20
    full = 20 * organ(0).nbytes
    assert history.nbytes * 200 < full, (history.nbytes, full)  # > 200x smaller than full uint8 masks
    assert np.array_equal(history.undo().mask, organ(18)) and history.current.mask.dtype == np.uint8
    # The byte budget drops the oldest versions first and always keeps the newest.
    per_version = history.current.nbytes
    small = EvidenceHistory(limit=20, max_bytes=3 * per_version + per_version // 2)
    for n in range(6):
        small.push(evidence, organ(n))
    assert len(small) == 3 and np.array_equal(small.current.mask, organ(5)) and small.nbytes <= 3.5 * per_version
    tiny = EvidenceHistory(max_bytes=1)
    tiny.push(evidence, organ(0))
    assert len(tiny) == 1 and np.array_equal(tiny.current.mask, organ(0))
    # A non-binary mask (labels) round-trips too.
    labels = (np.arange(2 * 3 * 4).reshape(2, 3, 4) % 5).astype(np.uint8)
    tiny.push(evidence, labels)
    assert np.array_equal(tiny.current.mask, labels)
