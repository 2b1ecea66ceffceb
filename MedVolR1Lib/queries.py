"""Clinical query templates per target, split into training and held-out phrasings.

No public volumetric-reasoning queries exist for TotalSegmentator or M3D-Seg, so they are generated:
direct ("segment the liver"), descriptive ("the organ that stores bile"), laterality ("the kidney on
the patient's left"), multi-part ("both kidneys"), lesion-centred ("the mass in the kidney") and, for the
KiTS23 lesions, paraphrases that never name them ("the obvious fluid-filled sac in the kidney"), the
paper's "KiTS23 (paraphrased)" column.
Every phrasing belongs to exactly one split: the held-out ones are never used for training, so an
evaluation on them measures generalisation to new wording, not recall of the training sentences.

A `TargetEntry` says which label names make up a target (alternatives, so TotalSegmentator's
``kidney_right`` + ``kidney_left`` and M3D-Seg's single ``kidney`` channel both give "kidneys") and
how to phrase queries about it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import DataError

QUERY_KINDS = ("direct", "descriptive", "laterality", "multi_part", "lesion", "paraphrase")
SPLITS = ("train", "held_out")

# Sentence frames; {x} is a noun phrase ("the liver", "both kidneys", "the organ that stores bile").
FRAMES: dict[str, tuple[str, ...]] = {
    "train": ("Segment {x}.", "Find {x}.", "Where is {x}?", "Locate {x} in this scan.", "Show {x}."),
    "held_out": ("Please delineate {x}.", "Can you outline {x} on this CT?", "I need a mask of {x}."),
}
PLURAL_FRAMES: dict[str, tuple[str, ...]] = {
    "train": ("Segment {x}.", "Find {x}.", "Where are {x}?", "Locate {x} in this scan.", "Show {x}."),
    "held_out": ("Please delineate {x}.", "Can you outline {x} on this CT?", "I need a mask of {x}."),
}


@dataclass(frozen=True)
class Query:
    """One query text with where it came from (kind) and which split it belongs to."""

    text: str
    kind: str
    split: str

    def to_dict(self) -> dict:
        return {"text": self.text, "kind": self.kind, "split": self.split}

    @classmethod
    def from_dict(cls, data: dict) -> "Query":
        return cls(str(data["text"]), str(data["kind"]), str(data["split"]))


@dataclass(frozen=True)
class Phrases:
    """Noun phrases of one kind for one target, per split."""

    train: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()

    def get(self, split: str) -> tuple[str, ...]:
        return self.train if split == "train" else self.held_out


@dataclass(frozen=True)
class TargetEntry:
    """A queryable target: which labels form it, and its phrases by query kind.

    `sources` are alternatives tried in order; each is a tuple of parts, each part a tuple of label
    name patterns (fnmatch, matched against normalised names).  A source with two or more parts is a
    paired organ: GT boxes are drawn one per part (side).
    """

    key: str
    sources: tuple[tuple[tuple[str, ...], ...], ...]
    phrases: dict[str, Phrases] = field(default_factory=dict)
    plural: bool = False
    one_box: bool = False  # one box around all pieces of each part (vertebrae), not one per component

    def resolve(self, names: dict[str, int] | dict[str, list[int]]) -> Optional[list[list[int]]]:
        """Label values per part for the first source that any given label name matches, else None."""
        for source in self.sources:
            parts: list[list[int]] = []
            for patterns in source:
                values: list[int] = []
                for name, value in names.items():
                    if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                        values.extend(value if isinstance(value, list) else [value])
                parts.append(sorted(set(values)))
            if any(parts):
                return [p for p in parts if p] if len(source) == 1 else parts
        return None

    def queries(self, split: Optional[str] = None) -> list[Query]:
        """All queries of this target (of one split if given), deterministic order."""
        frames = PLURAL_FRAMES if self.plural else FRAMES
        out: list[Query] = []
        for s in SPLITS if split is None else (split,):
            for kind in QUERY_KINDS:
                for phrase in self.phrases.get(kind, Phrases()).get(s):
                    for frame in frames[s]:
                        out.append(Query(frame.format(x=phrase), kind, s))
        return out


_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mentions_side(query: Query) -> bool:
    """Whether the query relies on laterality (kind or wording), for datasets whose orientation is unverified."""
    return query.kind == "laterality" or _SIDE_WORDS.search(query.text) is not None


def normalise_name(name: str) -> str:
    """'Kidney Tumor' -> 'kidney_tumor'; British spelling of tumour folded to the dataset's."""
    text = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    return text.replace("tumour", "tumor")


def _p(train: tuple[str, ...] = (), held_out: tuple[str, ...] = ()) -> Phrases:
    return Phrases(tuple(train), tuple(held_out))


def _single(key: str, noun: str, desc_train: tuple[str, ...], desc_held: tuple[str, ...], *aliases: str, held_noun: Optional[str] = None) -> TargetEntry:
    return TargetEntry(
        key=key,
        sources=tuple(((a,),) for a in (key, *aliases)),
        phrases={"direct": _p((f"the {noun}",), (f"the {held_noun or noun}",)), "descriptive": _p(desc_train, desc_held)},
    )


def _sided(key: str, noun: str, side: str, desc_train: tuple[str, ...] = (), desc_held: tuple[str, ...] = (), patterns: tuple[str, ...] = ()) -> TargetEntry:
    """A one-side target ('kidney_right'); laterality phrases use the patient's side."""
    return TargetEntry(
        key=key,
        sources=((patterns or (key,),),),
        phrases={
            "direct": _p((f"the {side} {noun}",), (f"the {noun} on the {side}",)),
            "laterality": _p(
                (f"the {noun} on the patient's {side}", f"the {side}-sided {noun}"),
                (f"the patient's {side} {noun}", f"the {noun} of the {side} side"),
            ),
            "descriptive": _p(desc_train, desc_held),
        },
    )


def _paired(key: str, plural_noun: str, right: tuple[str, ...], left: tuple[str, ...], single_channel: tuple[str, ...], desc_train: tuple[str, ...] = (), desc_held: tuple[str, ...] = ()) -> TargetEntry:
    """Both sides of a paired organ: one box per side (per connected part for a single-channel label)."""
    return TargetEntry(
        key=key,
        sources=((right, left), (single_channel,)),
        plural=True,
        phrases={
            "direct": _p((f"the {plural_noun}",), (f"the {plural_noun} in this scan",)),
            "multi_part": _p(
                (f"both {plural_noun}", f"the left and right {plural_noun}"),
                (f"each of the two {plural_noun}", f"the {plural_noun} on both sides"),
            ),
            "descriptive": _p(desc_train, desc_held),
        },
    )


def _lesion(key: str, noun: str, organ: str, train: tuple[str, ...], held: tuple[str, ...], *aliases: str, paraphrase: Phrases = Phrases()) -> TargetEntry:
    phrases = {"direct": _p((f"the {noun}",), (f"any {noun}",)), "lesion": _p(train, held)}
    if paraphrase.train or paraphrase.held_out:
        phrases["paraphrase"] = paraphrase
    return TargetEntry(key=key, sources=tuple(((a,),) for a in (key, *aliases)), phrases=phrases)


# KiTS23 paraphrases: what the lesion looks like, never its name (no "tumour", "cancer", "cyst", "lesion").
# The target is the lesion itself (KiTS23 labels 2 and 3), described through the kidney that holds it.
KITS23_PARAPHRASES: dict[str, Phrases] = {
    "kidney_tumor": _p(
        ("the solid mass growing from the kidney", "the enhancing lump that distorts the kidney outline",
         "the abnormal solid growth in the renal parenchyma", "the kidney's bulging solid nodule"),
        ("the solid growth that deforms the kidney", "the heterogeneous lump arising from the kidney"),
    ),
    "kidney_cyst": _p(
        ("the obvious fluid-filled sac in the kidney", "the round water-density pocket in the kidney",
         "the thin-walled bubble of fluid on the kidney"),
        ("the smooth watery pouch the kidney contains", "the dark watery blister sitting on the kidney"),
    ),
}


ENTRIES: tuple[TargetEntry, ...] = (
    _single("liver", "liver", ("the largest solid organ in the abdomen", "the organ that produces bile"), ("the organ in the right upper quadrant that filters the portal blood",)),
    _single("spleen", "spleen", ("the organ in the left upper quadrant that filters blood",), ("the lymphoid organ behind the stomach on the patient's left",)),
    _single("gallbladder", "gallbladder", ("the organ that stores bile",), ("the small pear-shaped sac under the liver",), "gall_bladder"),
    _single("stomach", "stomach", ("the organ where food is first digested",), ("the J-shaped organ below the diaphragm on the patient's left",)),
    _single("pancreas", "pancreas", ("the gland that produces insulin",), ("the retroperitoneal gland that lies behind the stomach",)),
    _single("aorta", "aorta", ("the largest artery of the body",), ("the main artery running in front of the spine",), held_noun="aortic lumen"),
    _single("inferior_vena_cava", "inferior vena cava", ("the large vein returning blood from the legs and abdomen",), ("the big vein to the right of the aorta",), "ivc", held_noun="IVC"),
    _single("urinary_bladder", "urinary bladder", ("the organ that stores urine",), ("the hollow muscular organ in the pelvis that collects urine",), "bladder", held_noun="bladder"),
    _single("duodenum", "duodenum", ("the first part of the small intestine",), ("the C-shaped bowel loop around the head of the pancreas",)),
    _single("colon", "colon", ("the large intestine",), ("the bowel that absorbs water before excretion",)),
    _single("small_bowel", "small bowel", ("the small intestine",), ("the loops of jejunum and ileum",)),
    _single("esophagus", "esophagus", ("the tube that carries food to the stomach",), ("the muscular food pipe behind the trachea",), "oesophagus", held_noun="oesophagus"),
    _single("heart", "heart", ("the organ that pumps blood",), ("the four-chambered muscular organ in the mediastinum",)),
    _single("prostate", "prostate", ("the gland below the bladder in men",), ("the male gland that surrounds the urethra",)),
    _single("brain", "brain", ("the organ inside the skull",), ("the central nervous tissue within the cranium",)),
    TargetEntry(
        key="vertebrae",
        sources=((("vertebrae_*", "vertebra"),),),
        plural=True,
        one_box=True,
        phrases={"direct": _p(("the vertebrae",), ("the vertebral column",)), "descriptive": _p(("the bones of the spine",), ("the backbone",))},
    ),
    _single("bone", "bones", ("the skeleton",), ("all bony structures",)),
    _sided("kidney_right", "kidney", "right"),
    _sided("kidney_left", "kidney", "left"),
    _paired("kidneys", "kidneys", ("kidney_right",), ("kidney_left",), ("kidney", "kidneys"), ("the organs that filter blood to make urine",), ("the bean-shaped retroperitoneal organs",)),
    _sided("adrenal_gland_right", "adrenal gland", "right"),
    _sided("adrenal_gland_left", "adrenal gland", "left"),
    _paired("adrenal_glands", "adrenal glands", ("adrenal_gland_right",), ("adrenal_gland_left",), ("adrenal_gland", "adrenal_glands"), ("the glands on top of the kidneys",), ("the small hormone glands above each kidney",)),
    _sided("lung_right", "lung", "right", patterns=("lung_right", "lung_*_right")),
    _sided("lung_left", "lung", "left", patterns=("lung_left", "lung_*_left")),
    _paired("lungs", "lungs", ("lung_right", "lung_*_right"), ("lung_left", "lung_*_left"), ("lungs", "lung"), ("the organs of breathing",), ("the air-filled organs in the chest",)),
    _lesion("kidney_tumor", "kidney tumour", "kidney", ("the tumour in the kidney", "the renal mass"), ("the renal tumour", "the malignant-looking lesion of the kidney"),
            paraphrase=KITS23_PARAPHRASES["kidney_tumor"]),
    _lesion("kidney_cyst", "kidney cyst", "kidney", ("the cyst in the kidney", "the fluid-filled renal lesion"), ("the renal cyst",),
            paraphrase=KITS23_PARAPHRASES["kidney_cyst"]),
    _lesion("kidney_cyst_right", "right kidney cyst", "kidney", ("the cyst in the right kidney",), ("the cystic lesion of the patient's right kidney",)),
    _lesion("kidney_cyst_left", "left kidney cyst", "kidney", ("the cyst in the left kidney",), ("the cystic lesion of the patient's left kidney",)),
    _lesion("liver_tumor", "liver tumour", "liver", ("the tumour in the liver", "the hepatic lesion"), ("the liver mass",), "liver_lesion"),
    _lesion("lesion", "lesion", "", ("the lesion",), ("the abnormal finding",), "tumor"),
)

_VERTEBRA_RE = re.compile(r"^vertebrae_([cCtTlLsS])(\d{1,2})$")
_REGION = {"c": "cervical", "t": "thoracic", "l": "lumbar", "s": "sacral"}
_ORDINAL = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth")


def _vertebra_entry(key: str) -> Optional[TargetEntry]:
    """'vertebrae_L3' -> entry with 'the L3 vertebra' / 'the third lumbar vertebra'."""
    match = _VERTEBRA_RE.match(key)
    if match is None:
        return None
    region, number = match.group(1).lower(), int(match.group(2))
    short = f"{region.upper()}{number}"
    ordinal = _ORDINAL[number - 1] if 1 <= number <= len(_ORDINAL) else f"{number}th"
    return TargetEntry(
        key=f"vertebrae_{short}",  # TotalSegmentator's spelling
        sources=(((key,),),),
        one_box=True,
        phrases={
            "direct": _p((f"the {short} vertebra",), (f"vertebra {short}",)),
            "descriptive": _p((f"the {ordinal} {_REGION[region]} vertebra",), (f"the {ordinal} {_REGION[region]} vertebral body",)),
        },
    )


_BY_KEY = {entry.key: entry for entry in ENTRIES}


def find_entry(name: str) -> Optional[TargetEntry]:
    """Entry for a target key or a label name it is built from, or None."""
    key = normalise_name(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    vertebra = _vertebra_entry(key)
    if vertebra is not None:
        return vertebra
    for entry in ENTRIES:  # a label name that alone forms an entry ('bladder', M3D-Seg's one-channel 'kidney')
        if any(key in source[0] for source in entry.sources if len(source) == 1):
            return entry
    return None


def get_entry(name: str) -> TargetEntry:
    """Like `find_entry`, but an unknown name is a DataError naming it."""
    entry = find_entry(name)
    if entry is None:
        raise DataError(f"unknown target or label name '{name}': no query templates for it (known: {', '.join(sorted(_BY_KEY))}, vertebrae_XN)")
    return entry


def known_label(name: str) -> bool:
    """Whether some target entry uses this label name (directly or through a pattern)."""
    key = normalise_name(name)
    if _vertebra_entry(key) is not None:
        return True
    return any(
        fnmatch.fnmatchcase(key, pattern) for entry in ENTRIES for source in entry.sources for part in source for pattern in part
    )


def queries_for(name: str, split: Optional[str] = None) -> list[Query]:
    """All queries for a target (DataError if unknown)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return get_entry(name).queries(split)
