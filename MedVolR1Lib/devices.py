"""One place that turns a user's device/dtype request into a torch device and dtype.

Every model (grounder, propagators, trainers) resolves devices here, so "auto" means the same thing
everywhere (CUDA in bf16 when present, else CPU in float32) and a request that cannot be met fails
early with a `DeviceError` saying what to do, instead of a deep torch traceback mid-inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import DeviceError

DtypeLike = Union[None, str, torch.dtype]

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class DeviceChoice:
    """A resolved device and the dtype models should compute in on it."""

    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else self.device.type
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "name": name}


def _cuda_missing_message(requested: str) -> str:
    built = torch.version.cuda
    how = (
        f"this torch {torch.__version__} is a CUDA {built} build but sees no GPU: check the driver with "
        "`nvidia-smi` and CUDA_VISIBLE_DEVICES"
        if built
        else f"this torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    )
    return f"device '{requested}' was requested but CUDA is not available ({how}); or use device='cpu' or 'auto'"


def parse_dtype(dtype: DtypeLike) -> Optional[torch.dtype]:
    """`None`/"auto" -> None (choose per device); names like "bf16" or a torch.dtype -> that dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise DeviceError(f"dtype {dtype} is not supported for models: use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise DeviceError(f"unknown dtype {dtype!r}: use one of auto, float32, bfloat16, float16")


def resolve_device(device: Union[str, torch.device, None] = "auto", dtype: DtypeLike = None) -> DeviceChoice:
    """Resolve "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (+ optional dtype) or raise DeviceError.

    Defaults: CUDA -> bfloat16 (float16 on GPUs without bf16), CPU/MPS -> float32 (CPU half precision is
    slow and lossy; ask for it explicitly if wanted).
    """
    requested = "auto" if device is None else str(device).strip().lower()
    wanted_dtype = parse_dtype(dtype)
    if requested == "auto":
        torch_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            torch_device = torch.device(requested)
        except (RuntimeError, ValueError) as exc:
            raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N ({exc})") from None
        if torch_device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(_cuda_missing_message(requested))
            index = 0 if torch_device.index is None else torch_device.index
            if index >= torch.cuda.device_count():
                raise DeviceError(
                    f"device '{requested}' was requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
                )
            torch_device = torch.device("cuda", index)
        elif torch_device.type == "mps":
            if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise DeviceError(f"device '{requested}' was requested but Apple MPS is not available; use 'cpu' or 'auto'")
        elif torch_device.type != "cpu":
            raise DeviceError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if wanted_dtype is None:
        if torch_device.type == "cuda":
            wanted_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            wanted_dtype = torch.float32
    return DeviceChoice(torch_device, wanted_dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (and MPS) out-of-memory errors, whatever torch version raised them."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def out_of_memory_error(what: str, advice: str) -> DeviceError:
    """A DeviceError for an OOM, after releasing cached blocks so the caller can retry smaller."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return DeviceError(f"the GPU ran out of memory while {what}: {advice}")
