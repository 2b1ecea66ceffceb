"""trl datasets over VRS records, with slice views rendered lazily on access.

The Arrow table holds one JSON string per record (a few kB); `with_transform` turns a row into the
conversational prompt, the PIL images of the shown slices (rendered through the shared
`VolumeStore`, cached by (case, slices)), and either the SFT completion or the GRPO reward target.
So thousands of 16-image samples never sit in memory, and trl's repetition of each GRPO prompt for
its rollouts renders the views once.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..anchor import AnswerFormat
from ..views import build_messages
from .records import VRSRecord
from .store import VolumeStore

THINK_TEMPLATE = "The query asks for the {target}. It is largest on slice {slice}; I box each separate part there."


def think_text(record: VRSRecord, mode: str) -> Optional[str]:
    """SFT think: none (answer only) or a short template built from GT (never chain-of-thought labels)."""
    if mode == "none":
        return None
    if mode == "template":
        return THINK_TEMPLATE.format(target=record.target.replace("_", " "), slice=record.gt_slice)
    raise ValueError(f"think mode must be 'none' or 'template', got {mode!r}")


def prompt_messages(record: VRSRecord, answer_format: Optional[AnswerFormat] = None) -> list[dict]:
    """System + user turn with `Slice k:` labels and image placeholders (trl fills them from `images`)."""
    return build_messages(record.slices, record.query, record.image_size, answer_format=answer_format)


def _records_dataset(records: Sequence[VRSRecord]):
    from datasets import Dataset

    return Dataset.from_dict({"record": [r.to_json() for r in records], "id": [r.id for r in records]})


def _load(json_text: str) -> VRSRecord:
    import json

    return VRSRecord.from_dict(json.loads(json_text))


def render_images(store: VolumeStore, record: VRSRecord, *, blank: bool = False) -> list:
    return store.views(record.case_id, record.slices, record.image_size, record.window, blank=blank).pil_images()


def sft_dataset(
    records: Sequence[VRSRecord], store: VolumeStore, *, think: str = "none", blank: bool = False, answer_format: Optional[AnswerFormat] = None
):
    """prompt / completion / images rows for trl's SFTTrainer (completion-only loss); targets in `answer_format`."""
    think_text(records[0], think) if records else None  # validate the mode early

    def transform(batch: dict) -> dict:
        out: dict[str, list] = {"prompt": [], "completion": [], "images": []}
        for text in batch["record"]:
            record = _load(text)
            out["prompt"].append(prompt_messages(record, answer_format))
            answer = record.answer_text(think=think_text(record, think), answer_format=answer_format)
            out["completion"].append([{"role": "assistant", "content": [{"type": "text", "text": answer}]}])
            out["images"].append(render_images(store, record, blank=blank))
        return out

    return _records_dataset(records).with_transform(transform)


def grpo_dataset(
    records: Sequence[VRSRecord], store: VolumeStore, *, max_boxes: int = 4, blank: bool = False, answer_format: Optional[AnswerFormat] = None
):
    """prompt / images / reward_target rows for trl's GRPOTrainer (reward_target reaches the reward functions)."""

    def transform(batch: dict) -> dict:
        out: dict[str, list] = {"prompt": [], "images": [], "reward_target": [], "case_id": [], "target": []}
        for text in batch["record"]:
            record = _load(text)
            out["prompt"].append(prompt_messages(record, answer_format))
            out["images"].append(render_images(store, record, blank=blank))
            out["reward_target"].append(record.reward_target(max_boxes=max_boxes, answer_format=answer_format).to_json())
            out["case_id"].append(record.case_id)
            out["target"].append(record.target)
        return out

    return _records_dataset(records).with_transform(transform)
