"""Slice views and chat messages for the VLM, the sample-data cache and the CLI's basic behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from MedVolR1Lib.anchor import ParsedAnswer, format_answer, parse_answer
from MedVolR1Lib.errors import AnchorError, DataError
from MedVolR1Lib.views import ViewGeometry, build_messages, render_views, select_slices
from MedVolR1Lib.volume import volume_from_array


def test_views_have_one_size_and_label_every_slice(sample_volume):
    views = render_views(sample_volume, num_views=16, image_size=448)
    assert len(views.slices) == 16 and len(set(views.slices)) == 16
    assert all(image.shape == (448, 448, 3) and image.dtype == np.uint8 for image in views.images)
    messages = build_messages(views.slices, "segment the liver", 448, images=views.pil_images())
    user = messages[1]["content"]
    texts = [c["text"] for c in user if c["type"] == "text"]
    assert texts[:16] == [f"Slice {k}:" for k in views.slices]
    assert sum(c["type"] == "image" for c in user) == 16
    assert "segment the liver" in texts[-1] and "448x448" in texts[-1]
    # each image directly follows its label
    for n, k in enumerate(views.slices):
        assert user[2 * n]["text"] == f"Slice {k}:" and user[2 * n + 1]["type"] == "image"


def test_slices_span_the_body_only():
    array = np.full((60, 40, 40), -1000.0, dtype=np.float32)
    array[10:50, 5:35, 5:35] = 40.0  # body occupies slices 10..49
    volume = volume_from_array(array, np.diag([-1.0, -1.0, 2.0, 1.0]))
    slices = select_slices(volume, 8)
    assert slices[0] == 10 and slices[-1] == 49 and len(slices) == 8


def test_aspect_ratio_is_kept():
    array = np.zeros((4, 50, 100), dtype=np.float32)
    volume = volume_from_array(array, np.diag([-1.0, -1.0, 1.0, 1.0]), modality="MR")
    geometry = ViewGeometry.for_volume(volume, 224)
    assert geometry.pixels_per_voxel_x == pytest.approx(geometry.pixels_per_voxel_y)
    assert geometry.offset_x == pytest.approx(0.0) and geometry.offset_y == pytest.approx(56.0)
    with pytest.raises(ValueError, match="multiple of 28"):
        ViewGeometry.for_volume(volume, 250)


def test_empty_query_is_refused():
    with pytest.raises(ValueError, match="query is empty"):
        build_messages([1, 2], "   ", 448)


def test_answer_to_anchor_checks_the_volume(sample_volume):
    geometry = ViewGeometry.for_volume(sample_volume, 448)
    text = format_answer(50, [[100, 120, 180, 200]], think="kidney on the left of the image")
    parsed = parse_answer(text)
    assert isinstance(parsed, ParsedAnswer) and parsed.think.startswith("kidney")
    anchor = geometry.anchor_from_answer(parsed, sample_volume.num_slices)
    assert anchor.slice_index == 50
    np.testing.assert_allclose(geometry.to_pixel_box(anchor.boxes[0]), (100, 120, 180, 200), atol=1e-6)
    with pytest.raises(AnchorError, match="out of range"):
        geometry.anchor_from_answer(ParsedAnswer(500, ((1, 1, 5, 5),)), sample_volume.num_slices)
    with pytest.raises(AnchorError, match="inverted"):
        geometry.anchor_from_answer(ParsedAnswer(5, ((50, 50, 10, 10),)), sample_volume.num_slices)
    with pytest.raises(AnchorError, match="outside"):
        geometry.anchor_from_answer(ParsedAnswer(5, ((2000, 2000, 2100, 2100),)), sample_volume.num_slices)


def test_fetch_sample_is_idempotent_and_offline_safe(sample_ct, monkeypatch, tmp_path):
    from MedVolR1Lib import sample_data

    again = sample_data.fetch_sample(offline=True)
    assert again.ct_path == sample_ct.ct_path and again.label_names[5] == "liver"
    monkeypatch.setenv("MEDVOLR1_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match="fetch-sample"):
        sample_data.fetch_sample(offline=True)


def test_cli_help_and_bad_box():
    out = subprocess.run([sys.executable, "-m", "MedVolR1Lib.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("fetch-sample", "samples", "demo", "propagate", "segment"):
        assert command in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "MedVolR1Lib.cli", "propagate", "--volume", "x.nii.gz", "--slice", "1", "--box", "1,2,3", "--out", "o"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "four numbers" in bad.stderr


def test_cli_reports_unreadable_scan_clearly(tmp_path):
    broken = tmp_path / "scan.nii.gz"
    broken.write_bytes(b"garbage")
    out = subprocess.run(
        [sys.executable, "-m", "MedVolR1Lib.cli", "propagate", "--volume", str(broken), "--slice", "1",
         "--box", "1,2,30,40", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "scan.nii.gz" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_cli_samples_writes_jsonl_and_png(tmp_path, sample_ct):
    out = subprocess.run([sys.executable, "-m", "MedVolR1Lib.cli", "samples", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    targets = {json.loads(line)["target"] for line in lines}
    assert {"liver", "spleen", "kidneys", "gallbladder"} <= targets
    assert (tmp_path / "key_slice_kidneys.png").stat().st_size > 1000


def test_cli_propagate_real_litemedsam_on_the_sample_ct(sample_volume, sample_labels, tmp_path):
    """The README's main job: GT anchor of the right kidney -> real LiteMedSAM weights -> Dice vs reference."""
    from MedVolR1Lib.targets import profile_target

    profile = profile_target(sample_labels == 2, "kidney_right")
    k = profile.key_slice
    geometry = ViewGeometry.for_volume(sample_volume, 448)
    boxes = [geometry.to_pixel_box(b) for b in profile.boxes(k)]
    command = [sys.executable, "-m", "MedVolR1Lib.cli", "propagate", "--volume", "sample", "--slice", str(k),
               "--propagator", "litemedsam", "--device", "cpu", "--reference", "sample", "--label", "2",
               "--name", "right kidney", "--out", str(tmp_path / "kidney")]
    for box in boxes:
        command += ["--box", ",".join(f"{v:.3f}" for v in box)]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["key_slice"] == k
    assert summary["reference"]["dice"] >= 0.85  # measured 0.94 (docs/oracle_litemedsam.md)
    record = json.loads((tmp_path / "kidney" / "evidence.json").read_text())
    assert record["provenance"]["propagator"]["name"] == "litemedsam"
    assert record["provenance"]["propagator"]["sha256"].startswith("79d8c9dc")
