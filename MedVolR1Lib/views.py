"""Labelled axial slice views for the VLM, and the exact rendered-pixel <-> voxel mapping.

Every slice of a volume is rendered at one fixed square size (a multiple of 28, the Qwen2.5-VL patch
grid, or of 32, Qwen3-VL's), keeping the physical aspect ratio (long side fills the image, the other is padded black) and
in radiological convention (the canonical volume order already is).  Because all slices share one
`ViewGeometry`, a box the model draws in pixels maps to voxels of any slice by one affine map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from .anchor import AnswerFormat, EvidenceAnchor, ParsedAnswer, PixelBox, VoxelBox
from .errors import AnchorError, VolumeError
from .volume import Volume
from .windowing import Window, resolve_window

DEFAULT_IMAGE_SIZE = 448
DEFAULT_NUM_VIEWS = 16

SYSTEM_PROMPT = (
    "You are a radiologist. You see labelled axial CT slices shown in radiological convention "
    "(anterior at the top, the patient's right on the image's left). Find the evidence for the query: "
    "choose the one slice that best shows the target and draw one box per separate part of the target on it."
)
_SCHEMA_EXAMPLES = {
    "medvolr1": '{{"slice": k, "boxes": [[x1, y1, x2, y2], ...]}}',
    "paper": '[{{"slice": k, "bbox_2d_list": [[x1, y1, x2, y2], ...]}}]',
}
_COORDINATE_TEXT = {
    "pixels": "pixel coordinates in that {size}x{size} image (x to the right, y down).",
    "norm1000": "coordinates in that image normalised to 0-1000 (x to the right, y down).",
}


def answer_instruction(image_size: int, answer_format: Optional[AnswerFormat] = None) -> str:
    """The instruction that ends the user turn, in the checkpoint's answer schema and coordinates."""
    fmt = answer_format or AnswerFormat()
    text = (
        "First think briefly inside <think></think>, then answer inside <answer></answer> with JSON "
        + _SCHEMA_EXAMPLES[fmt.schema]
        + ": k is one of the slice numbers shown, boxes are "
        + _COORDINATE_TEXT[fmt.coordinates]
    )
    return text.format(size=image_size)


@dataclass(frozen=True)
class ViewGeometry:
    """Affine map between voxel edge coordinates (i, j) of any axial slice and rendered pixels (x, y)."""

    image_size: int
    pixels_per_voxel_x: float
    pixels_per_voxel_y: float
    offset_x: float
    offset_y: float
    shape_ji: tuple[int, int]

    @classmethod
    def for_volume(cls, volume: Volume, image_size: int = DEFAULT_IMAGE_SIZE) -> "ViewGeometry":
        if image_size <= 0 or (image_size % 28 and image_size % 32):
            raise ValueError(f"image_size must be a multiple of 28 (Qwen2.5-VL patches) or 32 (Qwen3-VL), got {image_size}")
        _, rows, cols = volume.shape
        spacing_i, spacing_j, _ = volume.spacing
        width_mm, height_mm = cols * spacing_i, rows * spacing_j
        pixels_per_mm = image_size / max(width_mm, height_mm)
        px_x, px_y = spacing_i * pixels_per_mm, spacing_j * pixels_per_mm
        return cls(
            image_size=image_size,
            pixels_per_voxel_x=px_x,
            pixels_per_voxel_y=px_y,
            offset_x=(image_size - cols * px_x) / 2.0,
            offset_y=(image_size - rows * px_y) / 2.0,
            shape_ji=(rows, cols),
        )

    def pixel_from_voxel(self, i: np.ndarray | float, j: np.ndarray | float) -> tuple:
        return self.offset_x + np.asarray(i) * self.pixels_per_voxel_x, self.offset_y + np.asarray(j) * self.pixels_per_voxel_y

    def voxel_from_pixel(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        return (np.asarray(x) - self.offset_x) / self.pixels_per_voxel_x, (np.asarray(y) - self.offset_y) / self.pixels_per_voxel_y

    def to_voxel_box(self, box: Sequence[float]) -> VoxelBox:
        x1, y1, x2, y2 = (float(v) for v in box)
        i0, j0 = self.voxel_from_pixel(x1, y1)
        i1, j1 = self.voxel_from_pixel(x2, y2)
        return VoxelBox(float(i0), float(j0), float(i1), float(j1))

    def to_pixel_box(self, box: VoxelBox) -> PixelBox:
        x1, y1 = self.pixel_from_voxel(box.i0, box.j0)
        x2, y2 = self.pixel_from_voxel(box.i1, box.j1)
        return float(x1), float(y1), float(x2), float(y2)

    def anchor_from_answer(self, answer: ParsedAnswer, num_slices: int) -> EvidenceAnchor:
        """Pixel answer -> voxel anchor, validated against the volume (AnchorError if it does not fit)."""
        anchor = EvidenceAnchor(answer.slice_index, tuple(self.to_voxel_box(b) for b in answer.boxes))
        return anchor.validate((num_slices, *self.shape_ji)).clipped((num_slices, *self.shape_ji))

    def pixel_boxes(self, anchor: EvidenceAnchor) -> list[PixelBox]:
        return [self.to_pixel_box(b) for b in anchor.boxes]


def body_slice_range(volume: Volume, min_fraction: float = 0.02) -> tuple[int, int]:
    """First and last axial slice that contain body (not just air / padding), inclusive."""
    array = volume.array
    if volume.modality == "CT":
        body = array > -500.0
    else:
        body = array > np.percentile(array, 20)
    fractions = body.reshape(body.shape[0], -1).mean(axis=1)
    inside = np.flatnonzero(fractions >= min_fraction)
    if inside.size == 0:
        return 0, volume.num_slices - 1
    return int(inside[0]), int(inside[-1])


def select_slices(volume: Volume, num_views: int = DEFAULT_NUM_VIEWS, z_range: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
    """K slice indices spread evenly over the body's z-range (all slices if there are fewer)."""
    low, high = z_range if z_range is not None else body_slice_range(volume)
    if high - low + 1 <= num_views:
        return tuple(range(low, high + 1))
    return tuple(int(v) for v in np.unique(np.rint(np.linspace(low, high, num_views)).astype(int)))


def render_slice(volume: Volume, slice_index: int, geometry: ViewGeometry, window: Window) -> np.ndarray:
    """One axial slice as a (size, size, 3) uint8 RGB image, windowed, aspect kept, padded black."""
    if not 0 <= slice_index < volume.num_slices:
        raise AnchorError(f"slice {slice_index} is out of range 0..{volume.num_slices - 1}")
    from scipy.ndimage import map_coordinates

    size = geometry.image_size
    centres = np.arange(size, dtype=np.float64) + 0.5
    i_centre, j_centre = geometry.voxel_from_pixel(centres, centres)
    jj, ii = np.meshgrid(np.asarray(j_centre) - 0.5, np.asarray(i_centre) - 0.5, indexing="ij")
    plane = window.apply(volume.array[slice_index])
    resampled = map_coordinates(plane, [jj, ii], order=1, mode="constant", cval=0.0)
    inside = (jj >= -0.5) & (jj <= geometry.shape_ji[0] - 0.5) & (ii >= -0.5) & (ii <= geometry.shape_ji[1] - 0.5)
    gray = np.where(inside, resampled, 0.0)
    gray = np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


@dataclass
class SliceViews:
    """The K rendered slices shown to the VLM for one volume, and how to map answers back."""

    slices: tuple[int, ...]
    images: list[np.ndarray]
    geometry: ViewGeometry
    window: Window

    def pil_images(self) -> list:
        from PIL import Image

        return [Image.fromarray(image) for image in self.images]


def render_views(
    volume: Volume,
    slices: Optional[Sequence[int]] = None,
    *,
    num_views: int = DEFAULT_NUM_VIEWS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    window: Union[None, str, Window, tuple] = None,
) -> SliceViews:
    """Render the candidate slices (chosen over the body's z-range unless given)."""
    if volume.num_slices < 1:
        raise VolumeError(f"{volume.name}: volume has no slices")
    chosen = tuple(int(s) for s in slices) if slices is not None else select_slices(volume, num_views)
    geometry = ViewGeometry.for_volume(volume, image_size)
    resolved = resolve_window(volume.array, volume.modality, window)
    images = [render_slice(volume, k, geometry, resolved) for k in chosen]
    return SliceViews(slices=chosen, images=images, geometry=geometry, window=resolved)


def build_messages(
    slices: Sequence[int],
    query: str,
    image_size: int,
    images: Optional[Sequence] = None,
    *,
    answer_format: Optional[AnswerFormat] = None,
) -> list[dict]:
    """Qwen-VL chat messages: system prompt, then `Slice k:` + image for each view, then the query.

    With `images=None` the image entries are placeholders (``{"type": "image"}``), the form trl's
    trainers expect when images travel in a separate column.
    """
    query = (query or "").strip()
    if not query:
        raise ValueError("the query is empty: type a clinical question, e.g. 'segment the liver'")
    content: list[dict] = []
    for n, k in enumerate(slices):
        content.append({"type": "text", "text": f"Slice {k}:"})
        content.append({"type": "image", "image": images[n]} if images is not None else {"type": "image"})
    content.append({"type": "text", "text": f"Query: {query}\n" + answer_instruction(image_size, answer_format)})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]
