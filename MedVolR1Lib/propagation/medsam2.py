"""MedSAM2 propagator: the `sam2` package's video predictor with a MedSAM2 checkpoint, slices as video frames.

Why this shape:
- MedSAM2's `sam2.1_hiera_t512.yaml` is the package's `configs/sam2.1/sam2.1_hiera_t.yaml` with `image_size: 512`
  and memory-attention `feat_sizes: [32, 32]`, so we build the package's model with those hydra overrides and load
  `MedSAM2_latest.pt` strictly into it (the MedVol-R1 release uses `MedSAM2_2411.pt` with the same
  `sam2.1_hiera_t512` config; loading that file has not been tried here, no weights are offline).
- The stock `init_state` reads a JPEG folder and keeps backbone features of only the last visited frame; a CT is
  already in memory and a user edits boxes repeatedly, so `InMemorySAM2VideoPredictor` takes the slices as a
  tensor and keeps the backbone features of every slice: re-propagation never reruns the image encoder.
- Forward then reverse, each from fresh prompts (as MedSAM2's own 3D CT inference does), one object id per box.
  Several anchors are several conditioning frames of one video (SAM2 attends to all of them on every frame); a
  slice between two anchors takes the pass tracked from the nearer one, beyond them tracking goes outward; points
  join the box they are nearest; nothing leaves the evidence's z-range.
- Input as MedSAM2's authors run it (docs/medsam2_review.md): frames in the orientation of its CT training
  arrays (`frame_orientation`), boxes in its pixel-index convention, sam2's hole filling done without `_C`,
  optional largest-component step (per target: off for paired organs) and optional early stop of an object.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_video_predictor import SAM2VideoPredictor

from ..anchor import EvidenceAnchor, VoxelBox
from ..errors import AnchorError, CheckpointError, DeviceError
from ..evidence import Evidence, EvidencePoint
from ..hashing import file_sha256
from ..progress import ProgressCallback, report
from ..volume import Volume
from ..windowing import Window, window_volume
from .base import Propagator, resolve_slice_range

MEDSAM2_URL = "https://huggingface.co/wanglab/MedSAM2"
MEDSAM2_FILENAME = "MedSAM2_latest.pt"
SAM2_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# The three differences between MedSAM2's sam2.1_hiera_t512.yaml and the package's sam2.1_hiera_t.yaml.
MEDSAM2_T512_OVERRIDES: tuple[str, ...] = (
    "++model.image_size=512",
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
)
_PREDICTOR_TARGET = "++model._target_=MedVolR1Lib.propagation.medsam2.InMemorySAM2VideoPredictor"
_IMG_MEAN = (0.485, 0.456, 0.406)
_IMG_STD = (0.229, 0.224, 0.225)
# "transposed": rows follow the patient's right-left axis, columns anterior-posterior, the layout of the raw
# SimpleITK arrays of MedSAM2's CT training data (DeepLesion npz in its repository, see docs/medsam2_review.md);
# "radiological": the canonical view (anterior up, patient's right on the image's left).
FRAME_ORIENTATIONS = ("transposed", "radiological")


def resize_slices_uint8(gray_kji: np.ndarray, size: int) -> np.ndarray:
    """(K, J, I) uint8 slices -> (K, size, size) uint8, bicubic like MedSAM2's PIL preprocessing (aspect not kept)."""
    from PIL import Image

    out = np.empty((gray_kji.shape[0], size, size), dtype=np.uint8)
    for k, plane in enumerate(gray_kji):
        out[k] = np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((size, size), Image.BICUBIC))
    return out


class InMemoryFrames:
    """Slices kept as uint8 (K, S, S); indexing gives the normalised 3-channel float frame the encoder expects.

    Stands in for the stock predictor's `inference_state["images"]` (it supports len() and [k]) at 1/12 the memory.
    """

    def __init__(self, gray: torch.Tensor):
        if gray.dtype != torch.uint8 or gray.dim() != 3 or gray.shape[1] != gray.shape[2]:
            raise ValueError(f"expected uint8 (K, S, S) slices, got {tuple(gray.shape)} {gray.dtype}")
        self.gray = gray

    def __len__(self) -> int:
        return int(self.gray.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.gray.shape[-1])

    def batch(self, start: int, stop: int, device: Union[str, torch.device]) -> torch.Tensor:
        """Frames start..stop-1 as (B, 3, S, S) float32 on `device`, /255 then ImageNet mean/std."""
        return self._normalise(self.gray[start:stop], device)

    def take(self, indices: Sequence[int], device: Union[str, torch.device]) -> torch.Tensor:
        """Frames at `indices` as (B, 3, S, S) float32 on `device`."""
        return self._normalise(self.gray[torch.as_tensor(list(indices), dtype=torch.long)], device)

    @staticmethod
    def _normalise(gray: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
        x = gray.to(device, non_blocking=True).float().div_(255.0)
        mean = torch.tensor(_IMG_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMG_STD, device=x.device).view(1, 3, 1, 1)
        return (x.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std

    def __getitem__(self, idx: int) -> torch.Tensor:
        idx = int(idx)
        return self.batch(idx, idx + 1, self.gray.device)[0]


class InMemorySAM2VideoPredictor(SAM2VideoPredictor):
    """SAM2VideoPredictor fed from memory that keeps every frame's backbone features for the state's lifetime.

    Same parameters (and state dict) as the package's predictor; only how frames arrive and how long their
    features live differ. Instantiated by hydra through `_target_`.
    """

    @torch.inference_mode()
    def init_state_in_memory(
        self,
        frames: InMemoryFrames,
        video_height: int,
        video_width: int,
        *,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
    ) -> dict:
        """The stock `init_state` without the JPEG loader and without the frame-0 warm-up (we encode all frames)."""
        if frames.image_size != self.image_size:
            raise ValueError(f"frames are {frames.image_size} px, the model expects {self.image_size} px")
        compute_device = self.device
        if not offload_video_to_cpu:
            frames = InMemoryFrames(frames.gray.to(compute_device))
        state: dict = {
            "images": frames,
            "num_frames": len(frames),
            "offload_video_to_cpu": offload_video_to_cpu,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": int(video_height),
            "video_width": int(video_width),
            "device": compute_device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else compute_device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
            # ours: frame -> backbone_out, kept for every frame (the stock cache holds one frame)
            "frame_features": {},
        }
        return state

    @torch.inference_mode()
    def encode_frames(
        self,
        state: dict,
        frame_indices: Sequence[int],
        *,
        batch_size: int = 8,
        feature_device: Optional[Union[str, torch.device]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> None:
        """Run the image encoder once per frame (batched) and keep its outputs in state["frame_features"]."""
        store = state["frame_features"]
        todo = [int(f) for f in frame_indices if int(f) not in store]
        frames: InMemoryFrames = state["images"]
        feature_device = torch.device(feature_device) if feature_device is not None else self.device
        shared_pos: Optional[list[torch.Tensor]] = None
        for n in range(0, len(todo), max(1, batch_size)):
            chunk = todo[n : n + batch_size]
            images = frames.take(chunk, self.device)
            backbone_out = self.forward_image(images)
            if shared_pos is None:
                # the position encoding depends only on the feature-map shape: one copy serves every frame
                shared_pos = [p[0:1].to(feature_device).clone() for p in backbone_out["vision_pos_enc"]]
            for b, f in enumerate(chunk):
                store[f] = {
                    "backbone_fpn": [x[b : b + 1].to(feature_device).clone() for x in backbone_out["backbone_fpn"]],
                    "vision_pos_enc": shared_pos,
                }
            report(progress, (n + len(chunk)) / len(todo), f"MedSAM2: encoded {n + len(chunk)}/{len(todo)} slices")

    def move_features(self, state: dict, device: Union[str, torch.device]) -> None:
        """Move every kept frame feature to `device` (used to offload to CPU after a CUDA out-of-memory)."""
        device = torch.device(device)
        pos_cache: dict[int, torch.Tensor] = {}
        for feats in state["frame_features"].values():
            feats["backbone_fpn"] = [x.to(device) for x in feats["backbone_fpn"]]
            moved = []
            for p in feats["vision_pos_enc"]:
                if id(p) not in pos_cache:
                    pos_cache[id(p)] = p.to(device)
                moved.append(pos_cache[id(p)])
            feats["vision_pos_enc"] = moved

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        """As the stock method, but served from the per-frame store (moved to the compute device if offloaded)."""
        store = inference_state.get("frame_features")
        if not store or frame_idx not in store:
            return super()._get_image_feature(inference_state, frame_idx, batch_size)
        device = inference_state["device"]
        feats = store[frame_idx]
        image = inference_state["images"].batch(frame_idx, frame_idx + 1, device)
        expanded_backbone_out = {
            "backbone_fpn": [
                x.to(device, non_blocking=True).expand(batch_size, -1, -1, -1) for x in feats["backbone_fpn"]
            ],
            "vision_pos_enc": [
                p.to(device, non_blocking=True).expand(batch_size, -1, -1, -1) for p in feats["vision_pos_enc"]
            ],
        }
        features = self._prepare_backbone_features(expanded_backbone_out)
        return (image.expand(batch_size, -1, -1, -1),) + features

    def _run_single_frame_inference(self, *args, **kwargs):
        """As the stock method, with `fill_hole_area` applied by `fill_small_holes` (the stock one needs sam2's
        `_C` CUDA extension and silently skips without it), at the same point: after tracking, before storing."""
        area, self.fill_hole_area = self.fill_hole_area, 0
        try:
            current_out, pred_masks = super()._run_single_frame_inference(*args, **kwargs)
        finally:
            self.fill_hole_area = area
        if area > 0:
            pred_masks = fill_small_holes(pred_masks, area)
            current_out["pred_masks"] = pred_masks.to(current_out["pred_masks"].device, non_blocking=True)
        return current_out, pred_masks


@dataclass
class PropagationTrace:
    """What the last `propagate` did, for tests, debugging and provenance (not needed for the mask itself)."""

    key_slice: int
    slice_range: tuple[int, int]
    object_ids: tuple[int, ...]
    # direction ("forward" | "reverse") -> frames visited in order (a frame counts if any object ran on it)
    visited: dict[str, list[int]] = field(default_factory=dict)
    # (direction, obj_id) -> {frame: object score logit}; > 0 means the model sees the object there
    object_scores: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)
    # (direction, obj_id) -> frame where tracking of that object stopped because it vanished (absent: ran to the end)
    stopped_at: dict[tuple[str, int], int] = field(default_factory=dict)
    # obj_id -> box prompt on the key slice as the predictor stored it, model pixels (x0, y0, x1, y1) of the square
    model_boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    # (obj_id, frame) -> (coords (P, 2) in model pixels, labels (P,)) as the predictor stored them (2/3: box corners,
    # 1: positive point, 0: negative point)
    prompts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # obj_id -> (J, I) float32 mask logits on the key slice, at the volume's slice size
    key_logits: dict[int, np.ndarray] = field(default_factory=dict)
    # (direction, obj_id, frame) -> (J, I) float32 logits; only filled with keep_logits=True
    logits: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict)


class _StopRule:
    """An object ends after `patience` consecutive non-anchor frames where it is absent (object score <= 0 or
    empty); patience None never stops it (MedSAM2's official script tracks every frame)."""

    def __init__(self, patience: Optional[int]):
        self.patience = None if patience is None else max(1, int(patience))
        self.misses = 0

    def update(self, present: bool, is_key: bool) -> bool:
        """Feed one frame; return False once tracking of this object should stop."""
        if present or is_key:
            self.misses = 0
            return True
        self.misses += 1
        return self.patience is None or self.misses < self.patience


def _summarise_keys(keys: Sequence[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16): there bf16 autocast made CPU tracking
    and encoding ~1.7x faster (bench/gpu_bench_medsam2.py); elsewhere bf16 is emulated and only adds casts.
    Reads the Linux /proc/cpuinfo flags; any other OS answers False (float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return any(name in flags.split() for name in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> bfloat16 on CUDA and on CPUs with native bf16, else float32; other values are checked."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" or cpu_has_native_bf16() else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise DeviceError(f"unknown dtype {dtype!r}; use 'auto', 'bfloat16' or 'float32'")
    return dtype


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without CUDA -> DeviceError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was asked for MedSAM2 but CUDA is not available here; "
                "use device='cpu' (slow: about 0.3-0.5 s per slice at 512 px) or the LiteMedSAM propagator"
            )
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'")


class MedSAM2Propagator(Propagator):
    """Evidence (anchors, points, extent limits) -> 3D mask with MedSAM2 (SAM2.1 hiera-tiny video predictor, 512 px)."""

    name = "medsam2"

    def __init__(
        self,
        checkpoint: Union[str, os.PathLike],
        *,
        config: str = SAM2_TINY_CONFIG,
        base_overrides: Sequence[str] = MEDSAM2_T512_OVERRIDES,
        hydra_overrides: Sequence[str] = (),
        device: str = "auto",
        dtype: str = "auto",
        window: Union[None, str, Window, tuple] = None,
        stop_after_absent: Optional[int] = 2,
        fill_hole_area: int = 8,
        largest_component: bool = False,
        frame_orientation: str = "transposed",
        encode_batch: int = 8,
        offload: bool = False,
        keep_logits: bool = False,
    ):
        """checkpoint: MedSAM2_latest.pt (a {"model": state_dict} file); hydra_overrides are added after the
        MedSAM2 ones (the micro test model uses them); dtype 'auto' = bf16 autocast on CUDA and on CPUs with native
        bf16 (masks vs float32 on random weights: Dice 0.996, see docs/benchmarks.md), float32 elsewhere.

        stop_after_absent: stop an object after this many absent slices in a row (None: track every slice, as the
        official script); fill_hole_area: sam2's hole filling on the low-res scores (MedSAM2 builds with 8; 0: off);
        largest_component: keep each object's largest 3D component (the official script does; off for paired
        organs, see targets.propagation_settings); frame_orientation: see FRAME_ORIENTATIONS."""
        if frame_orientation not in FRAME_ORIENTATIONS:
            raise ValueError(f"frame_orientation must be one of {FRAME_ORIENTATIONS}, got {frame_orientation!r}")
        if stop_after_absent is not None and int(stop_after_absent) < 1:
            raise ValueError(f"stop_after_absent must be None or >= 1, got {stop_after_absent!r}")
        self.checkpoint = Path(checkpoint).expanduser()
        if not self.checkpoint.is_file():
            raise CheckpointError(
                f"MedSAM2 checkpoint not found: {self.checkpoint}. Download {MEDSAM2_FILENAME} from {MEDSAM2_URL} "
                "(Files tab) and pass its path (checkpoint=... in Python, --sam-checkpoint on the CLI, "
                "'MedSAM2 checkpoint' in Slicer), "
                "or use the LiteMedSAM propagator, which needs no download"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = config
        self.overrides = [*base_overrides, *hydra_overrides]
        self.window = window
        self.stop_after_absent = None if stop_after_absent is None else int(stop_after_absent)
        self.largest_component = bool(largest_component)
        self.frame_orientation = frame_orientation
        self.encode_batch = int(encode_batch)
        self.offload = bool(offload)
        self.keep_logits = bool(keep_logits)
        self.encoded_frames = 0  # frames the image encoder has run on, counted by a forward hook
        self.last_trace: Optional[PropagationTrace] = None
        self._sha256: Optional[str] = None
        self._volume: Optional[Volume] = None
        self._cache_key: Optional[tuple] = None
        self._state: Optional[dict] = None
        self.model = self._build_and_load()
        self.model.fill_hole_area = int(fill_hole_area)
        self.model.image_encoder.register_forward_hook(self._count_encoder)

    # ---- model ---------------------------------------------------------------------------------------------------
    def _count_encoder(self, module, inputs, output) -> None:
        self.encoded_frames += int(inputs[0].shape[0])

    def _build_and_load(self) -> InMemorySAM2VideoPredictor:
        try:
            payload = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip, EOF and weights_only errors all mean "not a usable checkpoint"
            raise CheckpointError(
                f"{self.checkpoint}: cannot read it as a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                f"download {MEDSAM2_FILENAME} again from {MEDSAM2_URL}"
            ) from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
            found = f"a dict with keys {sorted(map(str, payload))[:5]}" if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(
                f"{self.checkpoint}: expected a dict with the state dict under 'model' (as {MEDSAM2_FILENAME}), "
                f"got {found}"
            )
        state_dict = payload["model"]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*cannot import name '_C'.*")
            model = build_sam2_video_predictor(
                self.config,
                ckpt_path=None,
                device="cpu",
                hydra_overrides_extra=[_PREDICTOR_TARGET, *self.overrides],
            )
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise CheckpointError(
                f"{self.checkpoint}: does not match the SAM2 model built from {self.config} with overrides "
                f"{self.overrides}: missing keys {_summarise_keys(missing)}, unexpected keys "
                f"{_summarise_keys(unexpected)}. Is it {MEDSAM2_FILENAME} from {MEDSAM2_URL}?"
            )
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:  # same keys, different shapes: another model size / image size
            raise CheckpointError(
                f"{self.checkpoint}: tensor shapes do not match the model built from {self.config} with overrides "
                f"{self.overrides} ({str(exc).splitlines()[-1][:300]})"
            ) from exc
        return model.to(self.device).eval()

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.device.type == "cpu" and self.dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.checkpoint)
        return {
            "name": self.name,
            "checkpoint": str(self.checkpoint),
            "sha256": self._sha256,
            "config": self.config,
            "hydra_overrides": list(self.overrides),
            "image_size": self.image_size,
            "device": str(self.device),
            "dtype": self.dtype,
            "stop_after_absent": self.stop_after_absent,
            "fill_hole_area": int(self.model.fill_hole_area),
            "largest_component": self.largest_component,
            "frame_orientation": self.frame_orientation,
            "box_convention": "pixel-index (far edge = last covered pixel)",
        }

    @property
    def transposed(self) -> bool:
        return self.frame_orientation == "transposed"

    # ---- prepare -------------------------------------------------------------------------------------------------
    def prepare(self, volume: Volume, progress: Optional[ProgressCallback] = None) -> None:
        key = (volume.fingerprint, repr(self.window), self.frame_orientation)
        if self._cache_key == key and self._state is not None:
            self._volume = volume
            report(progress, 1.0, "MedSAM2: image features cached")
            return
        self._state, self._cache_key, self._volume = None, None, None
        gray = window_volume(volume, self.window, np.uint8)  # (K, J, I) in [0, 255]
        if self.transposed:
            gray = gray.transpose(0, 2, 1)  # (K, I, J): the training arrays' layout; masks are transposed back
        frames = InMemoryFrames(torch.from_numpy(resize_slices_uint8(gray, self.image_size)))
        _, rows, cols = gray.shape
        try:
            state = self._encode(frames, rows, cols, offload=self.offload, progress=progress)
        except torch.OutOfMemoryError:
            if self.offload:
                raise self._oom_error("encoding the slices even with offloading to CPU") from None
            self._free_cuda()
            warnings.warn(
                "MedSAM2: CUDA ran out of memory while encoding the slices; retrying with frames, features and "
                "tracking state kept in CPU memory (slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.offload = True
            try:
                state = self._encode(frames, rows, cols, offload=True, progress=progress)
            except torch.OutOfMemoryError:
                raise self._oom_error("encoding the slices even with offloading to CPU") from None
        self._state, self._cache_key, self._volume = state, key, volume

    def _encode(self, frames: InMemoryFrames, rows: int, cols: int, *, offload: bool, progress) -> dict:
        state = self.model.init_state_in_memory(
            frames, rows, cols, offload_video_to_cpu=offload, offload_state_to_cpu=offload
        )
        with torch.inference_mode(), self._autocast():
            self.model.encode_frames(
                state,
                range(len(frames)),
                batch_size=self.encode_batch,
                feature_device="cpu" if offload else self.device,
                progress=progress,
            )
        return state

    def _free_cuda(self) -> None:
        self._state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_error(self, during: str) -> DeviceError:
        return DeviceError(
            f"MedSAM2 ran out of GPU memory {during}; free the GPU (other models), crop the volume to the region "
            "of interest, use device='cpu', or use the LiteMedSAM propagator"
        )

    def _enable_offload(self) -> None:
        """After an OOM during tracking: move the kept features and future tracking state to CPU memory."""
        assert self._state is not None
        self.model.move_features(self._state, "cpu")
        self.model.reset_state(self._state)
        self._state["storage_device"] = torch.device("cpu")
        self._state["offload_state_to_cpu"] = True
        self._state["constants"].clear()
        self.offload = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- propagate -----------------------------------------------------------------------------------------------
    def propagate(
        self,
        evidence: Union[Evidence, EvidenceAnchor],
        *,
        merge: bool = True,
        slice_range: Optional[tuple[int, int]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> np.ndarray:
        """Evidence -> (K, J, I) uint8 mask; every anchor is a conditioning frame of one video (see `_plan`)."""
        if self._state is None or self._volume is None:
            raise RuntimeError("MedSAM2Propagator.propagate called before prepare(volume)")
        shape = self._volume.shape
        evidence = Evidence.coerce(evidence).validate(shape).clipped(shape)
        slices = sorted(evidence.anchor_slices)
        lo, hi = resolve_slice_range(slice_range, shape[0], slices[0])
        if evidence.z_range is not None:
            lo, hi = max(lo, int(evidence.z_range[0])), min(hi, int(evidence.z_range[1]))
        outside = [k for k in slices if not lo <= k <= hi]
        if outside:
            raise AnchorError(f"anchor slice(s) {outside} lie outside the slice range [{lo}, {hi}]")
        try:
            return self._propagate(evidence, lo, hi, merge, progress)
        except torch.OutOfMemoryError:
            if self.offload:
                raise self._oom_error("while tracking even with offloading to CPU") from None
            warnings.warn(
                "MedSAM2: CUDA ran out of memory while tracking; moving features and state to CPU memory and retrying",
                RuntimeWarning,
                stacklevel=2,
            )
            self._enable_offload()
            try:
                return self._propagate(evidence, lo, hi, merge, progress)
            except torch.OutOfMemoryError:
                raise self._oom_error("while tracking even with offloading to CPU") from None

    # -- orientation and prompt conventions at the MedSAM2 edge --
    def _frame_box(self, box: VoxelBox) -> list[float]:
        """Canonical voxel-edge box -> the official pixel-index box of the frame: far edges are the last covered
        pixel (MedSAM2's `mask2D_to_bbox` gives x_max = max index), so our edge i1 becomes i1 - 1."""
        i0, j0 = float(box.i0), float(box.j0)
        i1, j1 = max(i0, float(box.i1) - 1.0), max(j0, float(box.j1) - 1.0)
        return [j0, i0, j1, i1] if self.transposed else [i0, j0, i1, j1]

    def _frame_point(self, point: EvidencePoint) -> list[float]:
        """Canonical voxel centre (i, j) -> frame pixel (x, y); a voxel index is a pixel index (official points)."""
        return [float(point.j), float(point.i)] if self.transposed else [float(point.i), float(point.j)]

    def _to_canonical(self, plane: np.ndarray) -> np.ndarray:
        """(rows, cols) of a frame -> (J, I) of the canonical slice."""
        return np.ascontiguousarray(plane.T) if self.transposed else plane

    # -- planning --
    def _objects(self, evidence: Evidence) -> dict[int, dict[int, tuple[Optional[VoxelBox], list[EvidencePoint]]]]:
        """obj id -> {anchor slice: (box or None, points)}.

        Object b+1 is box b of the first anchor.  A box of another anchor joins the object whose box on the first
        anchor has the nearest centre (each object at most once per anchor); boxes left over start new objects.
        A point joins the object whose box on its slice is nearest (0 inside the box)."""
        primary = evidence.primary
        prompts: dict[int, dict[int, tuple[Optional[VoxelBox], list[EvidencePoint]]]] = {}
        reference: dict[int, VoxelBox] = {}
        for n, box in enumerate(primary.boxes, start=1):
            prompts[n] = {int(primary.slice_index): (box, [])}
            reference[n] = box
        for anchor in evidence.anchors[1:]:
            k = int(anchor.slice_index)
            pairs = sorted(
                (_centre_distance(box, reference[obj]), b, obj)
                for b, box in enumerate(anchor.boxes)
                for obj in reference
            )
            taken_boxes: set[int] = set()
            taken_objs: set[int] = set()
            for _, b, obj in pairs:
                if b in taken_boxes or obj in taken_objs:
                    continue
                prompts[obj][k] = (anchor.boxes[b], [])
                taken_boxes.add(b)
                taken_objs.add(obj)
            for b, box in enumerate(anchor.boxes):
                if b not in taken_boxes:
                    obj = max(prompts) + 1
                    prompts[obj] = {k: (box, [])}
                    reference[obj] = box
        for point in evidence.points:
            k = int(point.slice_index)
            here = [(obj, frames[k][0]) for obj, frames in prompts.items() if k in frames and frames[k][0] is not None]
            obj = min(here, key=lambda item: _point_box_distance(point, item[1]))[0]
            prompts[obj][k][1].append(point)
        return prompts

    @staticmethod
    def _plan(anchors: Sequence[int], lo: int, hi: int) -> dict[str, list[int]]:
        """Frames each pass decodes for one object with conditioning frames `anchors` (sorted).

        Between two anchors a < b a slice takes the forward pass (tracked from a) when nearer a, the reverse pass
        (from b) when nearer b, both (OR) when equidistant; above the highest anchor only the forward pass runs,
        below the lowest only the reverse one.  Every frame attends to all anchors' conditioning memories, as in
        SAM2's video predictor; anchor frames are in both passes (their prompt output)."""
        forward, reverse = [], []
        for f in range(lo, hi + 1):
            below = [a for a in anchors if a <= f]
            above = [a for a in anchors if a >= f]
            if below and above and (below[-1] == f):
                forward.append(f)
                reverse.append(f)
                continue
            d_below = f - below[-1] if below else None
            d_above = above[0] - f if above else None
            if d_below is not None and (d_above is None or d_below <= d_above):
                forward.append(f)
            if d_above is not None and (d_below is None or d_above <= d_below):
                reverse.append(f)
        return {"forward": forward, "reverse": reverse[::-1]}

    def _propagate(self, evidence: Evidence, lo: int, hi: int, merge: bool, progress) -> np.ndarray:
        shape = self._volume.shape
        prompts = self._objects(evidence)
        obj_ids = tuple(sorted(prompts))
        key = int(evidence.primary.slice_index)
        trace = PropagationTrace(key_slice=key, slice_range=(lo, hi), object_ids=obj_ids)
        plans = {obj: self._plan(sorted(prompts[obj]), lo, hi) for obj in obj_ids}
        if not any(set(plans[o]["reverse"]) - set(prompts[o]) for o in obj_ids):
            for o in obj_ids:  # the reverse pass would only repeat anchor frames the forward pass has
                plans[o]["reverse"] = []
        # (direction, obj) -> frame -> bool (J, I) mask where the object is present
        found: dict[tuple[str, int], dict[int, np.ndarray]] = {}
        total = sum(len(set().union(*(plans[o][d] for o in obj_ids))) for d in ("forward", "reverse"))
        done = [0]
        # no_grad, not inference_mode: under inference_mode autocast never caches its bf16 weight copies, so every
        # linear re-cast its weight on every frame (measured: ~20% of bf16 CPU tracking time was such copies)
        with torch.no_grad(), self._autocast():
            for direction in ("forward", "reverse"):
                if any(plans[o][direction] for o in obj_ids):
                    self._track(direction, prompts, plans, key, trace, found, progress, done, total)
        self.last_trace = trace
        out = np.zeros(shape, dtype=np.uint8)
        for obj in obj_ids:  # later objects win overlaps
            mask = np.zeros(shape, dtype=bool)
            for direction in ("forward", "reverse"):
                for frame, plane in found.get((direction, obj), {}).items():
                    mask[frame] |= plane
            if self.largest_component:
                mask = largest_component(mask)
            out[mask] = 1 if merge else obj
        report(progress, 1.0, "MedSAM2: done")
        return out

    def _track(self, direction, prompts, plans, key, trace, found, progress, done, total) -> None:
        """One pass over the frames the plans give it, from fresh prompts on every anchor frame."""
        model, state = self.model, self._state
        reverse = direction == "reverse"
        model.reset_state(state)  # clears prompts and tracking outputs; the kept frame features stay
        for obj in trace.object_ids:
            for frame, (box, points) in sorted(prompts[obj].items()):
                kwargs: dict = {}
                if box is not None:
                    kwargs["box"] = self._frame_box(box)
                if points:
                    kwargs["points"] = [self._frame_point(p) for p in points]
                    kwargs["labels"] = [1 if p.positive else 0 for p in points]
                model.add_new_points_or_box(state, frame_idx=frame, obj_id=obj, normalize_coords=True, **kwargs)
                idx = state["obj_id_to_idx"][obj]
                inputs = state["point_inputs_per_obj"][idx][frame]
                coords = inputs["point_coords"][0].float().cpu().numpy()
                labels = inputs["point_labels"][0].cpu().numpy()
                trace.prompts[(obj, frame)] = (coords, labels)
                if box is not None and frame == key:
                    trace.model_boxes[obj] = tuple(float(v) for v in coords[:2].reshape(-1))
        model.propagate_in_video_preflight(state)
        visited = trace.visited.setdefault(direction, [])
        todo = {obj: set(plans[obj][direction]) for obj in trace.object_ids}
        anchors = {obj: set(prompts[obj]) for obj in trace.object_ids}
        rules = {obj: _StopRule(self.stop_after_absent) for obj in trace.object_ids}
        dormant: set[int] = set()  # objects stopped until their next anchor frame in this direction
        frames = sorted(set().union(*todo.values()), reverse=reverse)
        for frame in frames:
            running = [o for o in trace.object_ids if frame in todo[o] and (o not in dormant or frame in anchors[o])]
            if not running:
                continue
            visited.append(frame)
            for obj in running:
                dormant.discard(obj)
                obj_idx = state["obj_id_to_idx"][obj]
                obj_output = state["output_dict_per_obj"][obj_idx]
                if frame in obj_output["cond_frame_outputs"]:
                    current = obj_output["cond_frame_outputs"][frame]
                    pred_masks = current["pred_masks"].to(state["device"], non_blocking=True)
                else:
                    current, pred_masks = model._run_single_frame_inference(
                        inference_state=state,
                        output_dict=obj_output,
                        frame_idx=frame,
                        batch_size=1,
                        is_init_cond_frame=False,
                        point_inputs=None,
                        mask_inputs=None,
                        reverse=reverse,
                        run_mem_encoder=True,
                    )
                    obj_output["non_cond_frame_outputs"][frame] = current
                state["frames_tracked_per_obj"][obj_idx][frame] = {"reverse": reverse}
                _, video_res = model._get_orig_video_res_output(state, pred_masks)
                logits = self._to_canonical(video_res[0, 0].float().cpu().numpy())
                score = float(current["object_score_logits"].float().reshape(-1)[0])
                trace.object_scores.setdefault((direction, obj), {})[frame] = score
                mask = logits > 0
                present = score > 0 and bool(mask.any())
                if frame == key and obj not in trace.key_logits:
                    trace.key_logits[obj] = logits
                if self.keep_logits:
                    trace.logits[(direction, obj, frame)] = logits
                if present:
                    found.setdefault((direction, obj), {})[frame] = mask
                if not rules[obj].update(present, frame in anchors[obj]):
                    later = [a for a in anchors[obj] if (a < frame if reverse else a > frame)]
                    trace.stopped_at[(direction, obj)] = frame
                    if later:
                        dormant.add(obj)
                        rules[obj] = _StopRule(self.stop_after_absent)
                    else:
                        todo[obj] = set()
            done[0] += 1
            report(progress, min(done[0] / max(total, 1), 1.0), f"MedSAM2: {direction} slice {frame}")


def _centre_distance(a: VoxelBox, b: VoxelBox) -> float:
    return math.hypot((a.i0 + a.i1 - b.i0 - b.i1) / 2.0, (a.j0 + a.j1 - b.j0 - b.j1) / 2.0)


def _point_box_distance(point: EvidencePoint, box: VoxelBox) -> float:
    di = max(box.i0 - point.i, 0.0, point.i - box.i1)
    dj = max(box.j0 - point.j, 0.0, point.j - box.j1)
    return math.hypot(di, dj)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 3D connected component (26-connected, as skimage's `measure.label` in MedSAM2's script)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def fill_small_holes(scores: torch.Tensor, max_area: int) -> torch.Tensor:
    """sam2's `fill_holes_in_mask_scores` without its `_C` CUDA extension: background regions (scores <= 0) that
    form an 8-connected component of at most `max_area` pixels get the score 0.1 (foreground).

    scores: (N, 1, H, W) low-res mask logits.  Same rule as sam2 (which skips it with a warning when `_C` is
    missing), so MedSAM2's fill_hole_area=8 takes effect here."""
    if max_area <= 0:
        return scores
    background = (scores <= 0).detach().cpu().numpy()
    holes = np.zeros_like(background)
    for n in range(background.shape[0]):
        labelled, count = ndimage.label(background[n, 0], structure=np.ones((3, 3), dtype=bool))
        if count == 0:
            continue
        areas = np.bincount(labelled.ravel(), minlength=count + 1)
        small = areas <= max_area
        small[0] = False
        holes[n, 0] = small[labelled]
    if not holes.any():
        return scores
    fill = torch.from_numpy(holes).to(scores.device)
    return torch.where(fill, torch.tensor(0.1, dtype=scores.dtype, device=scores.device), scores)
