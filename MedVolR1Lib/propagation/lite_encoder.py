"""LiteMedSAM's image encoder (TinyViT) on the CPU paths this machine offers, and the choice between them.

Why: the encoder is the cost of a first mask (every slice a walk visits is encoded once), and how fast it runs
depends on the CPU: PyTorch's bf16 autocast is fast only where the CPU does bf16 natively (AVX512-BF16 or AMX);
without it, ONNX Runtime's fp32 graph is about twice PyTorch's fp32 speed with the same numbers, and int8
(ONNX Runtime dynamic quantization of the weight matrices) uses VNNI's integer dot products.  Measured on the
sample CT in docs/benchmarks.md ("Cold start"); `choose_encoder` encodes those measurements.

Backends take preprocessed slices (B, 3, 256, 256) and return fp32 embeddings (B, 256, 64, 64).  The ONNX
graphs are exported from the loaded PyTorch encoder once and kept in the user's cache folder, keyed by the
checkpoint's hash and the torch / onnxruntime versions (an export and an int8 quantization take 10-40 s here).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import MedVolR1Error
from ..volume import atomic_write

ENCODERS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
PRECISION_OF = {"torch-fp32": "fp32", "torch-bf16": "bf16", "onnx-fp32": "fp32", "onnx-int8": "int8"}
ONNX_EXTRA = "pip install 'medvolr1[fast-encoder]' (onnxruntime and onnx)"


class EncoderUnavailableError(MedVolR1Error):
    """An encoder path asked for that this installation or device cannot run (a one-line error in the CLI)."""


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions that decide which encoder path is fast (from /proc/cpuinfo's flags)."""

    avx2: bool = False
    avx512: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False

    @property
    def vnni(self) -> bool:
        """Integer dot products for int8 (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    @property
    def bf16(self) -> bool:
        """Native bf16 math (AVX512-BF16 or AMX-BF16); without it bf16 autocast is emulated and slow."""
        return self.avx512_bf16 or self.amx_bf16

    def describe(self) -> str:
        names = [name for name in ("avx2", "avx512", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                 if getattr(self, name)]
        return " ".join(names) or "none of avx2/avx512/vnni/bf16/amx"


def parse_cpu_flags(cpuinfo: str) -> CpuFeatures:
    """CpuFeatures from the text of /proc/cpuinfo (the first "flags" line; all cores share it)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            flags = set(line.split(":", 1)[1].split())
            break
    return CpuFeatures(
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        avx512_vnni="avx512_vnni" in flags,
        avx_vnni="avx_vnni" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        amx_int8="amx_int8" in flags,
    )


def detect_cpu_features() -> CpuFeatures:
    """This machine's CpuFeatures; none where /proc/cpuinfo cannot be read (not Linux): the safe fp32 paths."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text(errors="ignore"))
    except OSError:
        return CpuFeatures()


def onnxruntime_available() -> bool:
    """ONNX Runtime and the exporter's packages are installed (the `fast-encoder` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def choose_encoder(features: CpuFeatures, onnx_available: bool, device_type: str = "cpu") -> str:
    """The fastest encoder path measured for these features whose masks match fp32's (docs/benchmarks.md).

    - CUDA: PyTorch bf16 autocast.
    - native bf16: PyTorch bf16 autocast (on this quiet CPU 1.13x int8's speed, 1.44x ONNX Runtime fp32's).
    - no native bf16, ONNX Runtime installed: ONNX Runtime fp32 (PyTorch's numbers, about twice as fast).  int8
      is not picked even with VNNI: its masks moved a target by more than the 0.02 Dice allowed (see the docs).
    - otherwise PyTorch fp32.
    """
    if device_type != "cpu":
        return "torch-bf16"
    if features.bf16:
        return "torch-bf16"
    if onnx_available:
        return "onnx-fp32"
    return "torch-fp32"


def resolve_encoder(encoder: str, precision: str, device_type: str,
                    features: Optional[CpuFeatures] = None, onnx_available: Optional[bool] = None) -> str:
    """The encoder path for the propagator's `encoder` and `precision` settings.

    encoder "auto" defers to precision: "fp32" / "bf16" name the PyTorch path, "auto" lets `choose_encoder` pick
    for this CPU.  An ONNX path on CUDA, or without onnxruntime installed, is a clear error here."""
    if encoder not in ("auto", *ENCODERS):
        raise ValueError(f"encoder must be 'auto' or one of {ENCODERS}, got {encoder!r}")
    if encoder == "auto":
        if precision == "fp32":
            return "torch-fp32"
        if precision == "bf16":
            return "torch-bf16"
        features = detect_cpu_features() if features is None else features
        onnx_available = onnxruntime_available() if onnx_available is None else onnx_available
        return choose_encoder(features, onnx_available, device_type)
    if encoder.startswith("onnx"):
        if device_type != "cpu":
            raise EncoderUnavailableError(
                f"encoder {encoder!r} runs on the CPU only; use torch-bf16 or torch-fp32 on {device_type}")
        if not (onnxruntime_available() if onnx_available is None else onnx_available):
            raise EncoderUnavailableError(f"encoder {encoder!r} needs ONNX Runtime: {ONNX_EXTRA}")
    return encoder


# ---------------------------------------------------------------------------------------------------------
# backends: images (B, 3, 256, 256) float32 -> embeddings (B, 256, 64, 64) float32

class TorchEncoder:
    """The PyTorch module, fp32 or under bf16 autocast."""

    def __init__(self, module, precision: str, device) -> None:
        self.module, self.precision, self.device = module, precision, device

    def __call__(self, images):
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            return self.module(images).float()


class OnnxEncoder:
    """The encoder exported to ONNX and run by ONNX Runtime on the CPU, fp32 or int8.

    int8 is ONNX Runtime's dynamic quantization of the MatMul/Gemm weight matrices (per output channel; the
    activations are quantized per call).  Attention's activation-by-activation products and the convolutions
    stay fp32: quantizing them too (dynamic, or static with calibration on the sample CT) moved the embeddings
    by 19-75 % (relative L2), against 7 % for the weights alone and 5 % for bf16."""

    def __init__(self, module, int8: bool, cache_key: str, threads: Optional[int] = None,
                 cache_dir: Optional[Path] = None) -> None:
        import onnxruntime as ort
        import torch

        self.int8 = int8
        self.path = onnx_graph(module, cache_key, int8, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: the CPU is shared with the decoder and the UI.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images):
        import numpy as np
        import torch

        planes = images.detach().float().contiguous().cpu().numpy()
        out = [self.session.run(None, {"image": np.ascontiguousarray(planes[n : n + 1])})[0] for n in range(len(planes))]
        return torch.from_numpy(np.concatenate(out))


def default_cache_dir() -> Path:
    """encoders/ in the per-user cache (sample_data.cache_dir; MEDVOLR1_CACHE overrides it)."""
    from ..sample_data import cache_dir

    return cache_dir() / "encoders"


def onnx_graph(module, cache_key: str, int8: bool, cache_dir: Optional[Path] = None) -> Path:
    """Path of the fp32 (or int8) ONNX graph of `module`, exported (and quantized) on first use, written atomically.

    The export is traced at batch 1 (TinyViT's window reshapes take the batch size as a constant)."""
    import onnxruntime
    import torch

    folder = (cache_dir or default_cache_dir()) / f"{cache_key}-torch{torch.__version__}-ort{onnxruntime.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "encoder_fp32.onnx"
    if not fp32.is_file():
        atomic_write(fp32, lambda tmp: _export(module, Path(tmp)))
    if not int8:
        return fp32
    quantized = folder / "encoder_int8.onnx"
    if not quantized.is_file():
        atomic_write(quantized, lambda tmp: quantize_weights(fp32, Path(tmp)))
    return quantized


def _export(module, path: Path) -> None:
    import warnings

    import torch

    param = next(module.parameters())
    example = torch.zeros(1, 3, 256, 256, dtype=torch.float32, device=param.device)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the tracer's notes on TinyViT's Python-int shapes
        torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["embedding"],
                          opset_version=17, dynamo=False)


def quantize_weights(fp32_path: Path, out_path: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm nodes that multiply by a weight matrix, per channel."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred and the graph fused, as ORT asks before quantizing
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        _quantize_matmul_weights(prepared, out_path)


def _quantize_matmul_weights(fp32_path: Path, out_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    activation_products = [n.name for n in model.graph.node
                           if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=activation_products)


def build_encoder(name: str, module, device, cache_key: str, cache_dir: Optional[Path] = None):
    """The backend for an encoder path of ENCODERS (after `resolve_encoder`)."""
    if name == "torch-fp32":
        return TorchEncoder(module, "fp32", device)
    if name == "torch-bf16":
        return TorchEncoder(module, "bf16", device)
    if name in ("onnx-fp32", "onnx-int8"):
        return OnnxEncoder(module, name == "onnx-int8", cache_key, cache_dir=cache_dir)
    raise ValueError(f"unknown encoder {name!r}; choose one of {ENCODERS}")
