"""VLM families the grounder and trainers support, and the box-coordinate convention each one grounds in.

Qwen2.5-VL grounds in absolute pixels of its (resized) frame; Qwen3-VL in coordinates normalised to
0-1000.  The convention is one setting per checkpoint: it defaults from the family, is recorded in
every trained adapter's manifest, and an adapter is never used with another convention
(`check_adapter_convention`).  Reading the family needs only config.json, not torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

COORDINATES = ("pixels", "norm1000")


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the supported families: config model types, coordinates, patch grid."""

    name: str
    model_types: tuple[str, ...]
    coordinates: str  # the family's native grounding convention
    patch_multiple: int  # patch size x spatial merge: rendered views should be a multiple of it

    def check_image_size(self, image_size: int) -> None:
        if image_size % self.patch_multiple:
            raise ValueError(f"{self.name} views should be a multiple of {self.patch_multiple} px, got {image_size}")


FAMILIES = {
    "qwen2.5-vl": ModelFamily("qwen2.5-vl", ("qwen2_5_vl",), "pixels", 28),
    "qwen3-vl": ModelFamily("qwen3-vl", ("qwen3_vl", "qwen3_vl_moe"), "norm1000", 32),
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_model_type(model_type: Optional[str]) -> ModelFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise CheckpointError(
        f"model type {model_type!r} is not a supported VLM family (Qwen2.5-VL: qwen2_5_vl; Qwen3-VL: qwen3_vl)"
    )


def family_of_checkpoint(ref: str) -> ModelFamily:
    """Family of a local checkpoint folder (config.json) or, failing that, of a hub id's name."""
    config = Path(str(ref)).expanduser() / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except ValueError as exc:
            raise CheckpointError(f"could not load the checkpoint {config.parent}: unreadable config.json ({exc})") from exc
        return family_of_model_type(model_type)
    lowered = str(ref).lower()
    if "qwen3-vl" in lowered:
        return FAMILIES["qwen3-vl"]
    if "qwen2.5-vl" in lowered:
        return FAMILIES["qwen2.5-vl"]
    try:
        from transformers import AutoConfig

        return family_of_model_type(AutoConfig.from_pretrained(str(ref), trust_remote_code=False).model_type)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot tell the model family of {ref!r}: {exc}") from exc


def resolve_coordinates(family: ModelFamily, requested: str = "auto") -> str:
    """'auto' -> the family's convention; an explicit 'pixels' / 'norm1000' is kept (one setting per run)."""
    if requested in (None, "", "auto"):
        return family.coordinates
    if requested not in COORDINATES:
        raise ValueError(f"coordinates must be auto, pixels or norm1000, got {requested!r}")
    return requested


def check_adapter_convention(adapter_info: dict, family: ModelFamily, coordinates: str, where: str, schema: Optional[str] = None) -> None:
    """Refuse an adapter trained for another family, coordinate convention or answer schema (CheckpointError).

    `adapter_info` is the adapter's training manifest; fields it lacks are not checked.
    """
    trained_family = adapter_info.get("family")
    if trained_family and trained_family != family.name:
        raise CheckpointError(f"{where}: adapter was trained on {trained_family}, but the base model is {family.name}")
    trained = adapter_info.get("coordinates")
    if trained and trained != coordinates:
        raise CheckpointError(
            f"{where}: adapter was trained with {trained} box coordinates, but this run uses {coordinates}; "
            f"set coordinates: {trained} (or retrain) so boxes are never read in the wrong convention"
        )
    trained_schema = adapter_info.get("answer_schema")
    if schema and trained_schema and trained_schema != schema:
        raise CheckpointError(
            f"{where}: adapter was trained to answer in the {trained_schema} schema, but this run uses {schema}; "
            f"set answer_schema: {trained_schema}"
        )
