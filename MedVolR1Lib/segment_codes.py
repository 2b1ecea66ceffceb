"""Coded meaning of a segment: SNOMED CT category, type, laterality and display colour.

DICOM SEG and Slicer's `.seg.nrrd` both describe a segment by a (category, type, modifier) triple of
codes, so a PACS or Slicer shows "Kidney, Right" rather than free text.  Codes come only from
pydicom's SNOMED CT dictionary (`codes.SCT`, `codes.cid7150`); none is typed in here.  A target the
query catalogue (queries.py) does not know keeps its free-text label with the generic category and
type "Tissue", which is what Slicer itself uses for an unnamed segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .queries import ENTRIES, QUERY_KINDS, TargetEntry, find_entry, normalise_name

# entry key -> (category in CID 7150, SNOMED type attribute of codes.SCT, laterality, anatomic region)
_ORGAN, _LESION = codes.cid7150.AnatomicalStructure, codes.cid7150.MorphologicallyAbnormalStructure
_TYPES: dict[str, tuple[Code, str, Optional[str], Optional[str]]] = {
    "liver": (_ORGAN, "Liver", None, None),
    "spleen": (_ORGAN, "Spleen", None, None),
    "gallbladder": (_ORGAN, "Gallbladder", None, None),
    "stomach": (_ORGAN, "Stomach", None, None),
    "pancreas": (_ORGAN, "Pancreas", None, None),
    "aorta": (_ORGAN, "Aorta", None, None),
    "inferior_vena_cava": (_ORGAN, "InferiorVenaCava", None, None),
    "urinary_bladder": (_ORGAN, "UrinaryBladderStructure", None, None),
    "duodenum": (_ORGAN, "Duodenum", None, None),
    "colon": (_ORGAN, "Colon", None, None),
    "small_bowel": (_ORGAN, "SmallIntestine", None, None),
    "esophagus": (_ORGAN, "Esophagus", None, None),
    "heart": (_ORGAN, "Heart", None, None),
    "prostate": (_ORGAN, "Prostate", None, None),
    "brain": (_ORGAN, "Brain", None, None),
    "vertebrae": (_ORGAN, "StructureOfVertebralColumn", None, None),
    "bone": (_ORGAN, "Bone", None, None),
    "kidney_right": (_ORGAN, "Kidney", "Right", None),
    "kidney_left": (_ORGAN, "Kidney", "Left", None),
    "kidneys": (_ORGAN, "Kidney", "Bilateral", None),
    "adrenal_gland_right": (_ORGAN, "AdrenalGland", "Right", None),
    "adrenal_gland_left": (_ORGAN, "AdrenalGland", "Left", None),
    "adrenal_glands": (_ORGAN, "AdrenalGland", "Bilateral", None),
    "lung_right": (_ORGAN, "Lung", "Right", None),
    "lung_left": (_ORGAN, "Lung", "Left", None),
    "lungs": (_ORGAN, "Lung", "Bilateral", None),
    "kidney_tumor": (_LESION, "Tumor", None, "Kidney"),
    "kidney_cyst": (_LESION, "Cyst", None, "Kidney"),
    "kidney_cyst_right": (_LESION, "Cyst", None, "Kidney"),
    "kidney_cyst_left": (_LESION, "Cyst", None, "Kidney"),
    "liver_tumor": (_LESION, "Tumor", None, "Liver"),
    "lesion": (_LESION, "Lesion", None, None),
}

# Display colours (RGB 0-255) in the spirit of Slicer's GenericAnatomyColors; only for display.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "Liver": (221, 130, 101), "Spleen": (157, 108, 162), "Gallbladder": (139, 150, 98), "Stomach": (216, 132, 105),
    "Pancreas": (249, 180, 111), "Aorta": (224, 97, 76), "InferiorVenaCava": (0, 151, 206),
    "UrinaryBladderStructure": (222, 154, 132), "Duodenum": (255, 253, 229), "Colon": (204, 168, 143),
    "SmallIntestine": (205, 167, 142), "Esophagus": (211, 171, 143), "Heart": (206, 110, 84), "Prostate": (230, 158, 140),
    "Brain": (250, 250, 225), "StructureOfVertebralColumn": (241, 214, 145), "Bone": (241, 214, 145),
    "Kidney": (185, 102, 83), "AdrenalGland": (249, 186, 150), "Lung": (197, 165, 145), "Tumor": (144, 238, 144),
    "Cyst": (216, 101, 79), "Lesion": (144, 238, 144),
}
GENERIC_COLOUR = (128, 174, 128)  # Slicer's default "tissue" green


@dataclass(frozen=True)
class SegmentTerm:
    """What a segment is, in codes both DICOM SEG and Slicer read; `key` is the catalogue entry (None: unknown)."""

    label: str
    category: Code
    type: Code
    modifier: Optional[Code] = None  # laterality of the type (Left / Right / Bilateral)
    anatomic_region: Optional[Code] = None  # the organ a lesion lies in
    colour: tuple[int, int, int] = GENERIC_COLOUR
    key: Optional[str] = None

    def slicer_terminology(self) -> dict:
        """The dict slicerio writes as Slicer's `Segment{N}_Tags` TerminologyEntry."""
        triple = lambda code: [code.scheme_designator, code.value, code.meaning]  # noqa: E731
        entry = {
            "contextName": "Segmentation category and type - DICOM master list",
            "category": triple(self.category),
            "type": triple(self.type),
        }
        if self.modifier is not None:
            entry["typeModifier"] = triple(self.modifier)
        if self.anatomic_region is not None:
            entry["anatomicContextName"] = "Anatomic codes - DICOM master list"
            entry["anatomicRegion"] = triple(self.anatomic_region)
        return entry


def _vertebra_type(key: str) -> Optional[str]:
    """'vertebrae_L3' -> 'L3Vertebra' when SNOMED (as pydicom ships it) has that level."""
    name = key.split("_", 1)[1].upper() + "Vertebra" if key.startswith("vertebrae_") else ""
    return name if name and hasattr(codes.SCT, name) else None


def _phrase_index() -> dict[str, str]:
    """Every catalogue phrase ('the left kidney', 'both kidneys') without its article -> entry key."""
    index: dict[str, str] = {}
    for entry in ENTRIES:
        for kind in QUERY_KINDS:
            phrases = entry.phrases.get(kind)
            for phrase in (phrases.train + phrases.held_out) if phrases else ():
                text = normalise_name(phrase)
                index.setdefault(text[4:] if text.startswith("the_") else text, entry.key)
    return index


_PHRASES = _phrase_index()


def catalogue_key(target: str) -> Optional[str]:
    """The catalogue entry a target name means: a key or label name ('kidney_right'), or a phrase ('left kidney')."""
    entry: Optional[TargetEntry] = find_entry(target)
    if entry is not None:
        return entry.key
    text = normalise_name(target)
    return _PHRASES.get(text[4:] if text.startswith("the_") else text)


def term_for_target(target: str) -> SegmentTerm:
    """Codes and colour for a target name; unknown targets: category and type Tissue, label kept as given."""
    key = catalogue_key(target)
    label = (target or "target").strip() or "target"
    if key and key.startswith("vertebrae_"):  # one level; pydicom's SNOMED lacks some (S1): the generic vertebra
        vertebra = getattr(codes.SCT, _vertebra_type(key) or "Vertebra")
        return SegmentTerm(label, _ORGAN, vertebra, colour=_COLOURS["Bone"], key=key)
    if key not in _TYPES:
        return SegmentTerm(label, codes.cid7150.Tissue, codes.SCT.Tissue)
    category, type_name, side, region = _TYPES[key]
    return SegmentTerm(
        label,
        category,
        getattr(codes.SCT, type_name),
        modifier=getattr(codes.SCT, side) if side else None,
        anatomic_region=getattr(codes.SCT, region) if region else None,
        colour=_COLOURS.get(type_name, GENERIC_COLOUR),
        key=key,
    )
