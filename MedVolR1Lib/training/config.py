"""Script argument dataclasses shared by Training/*.py (parsed by trl's TrlParser, YAML via --config).

Field names must not collide with SFTConfig / GRPOConfig fields (HfArgumentParser merges them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TINY_MODEL = "tiny"  # model_name_or_path value that builds the offline tiny Qwen2.5-VL fixture
# model_name_or_path values that build an offline tiny fixture: (family, size, folder suffix)
TINY_MODELS = {
    "tiny": ("qwen2.5-vl", "tiny", ""),
    "tiny-small": ("qwen2.5-vl", "small", "-small"),
    "tiny-qwen3": ("qwen3-vl", "tiny", "-qwen3"),
    "tiny-qwen3-small": ("qwen3-vl", "small", "-qwen3-small"),
}


def tiny_model_path(name: str, folder: str) -> "str | None":
    """'tiny' / 'tiny-small' (Qwen2.5-VL), 'tiny-qwen3' / 'tiny-qwen3-small' (Qwen3-VL) -> build (or reuse)
    that fixture beside `folder`; None for real models."""
    if name not in TINY_MODELS:
        return None
    from ..fixtures.tiny_qwen import build_tiny_qwen

    family, size, suffix = TINY_MODELS[name]
    return str(build_tiny_qwen(f"{folder}{suffix}", size=size, family=family))


@dataclass
class VRSDataArguments:
    """Which prepared VRS data to train on (Training/prepare_data.py output folder)."""

    data_dir: str = field(default="runs/data", metadata={"help": "folder with cases.json and <split>.jsonl"})
    train_file: str = field(default="train", metadata={"help": "records file stem for training"})
    max_train_records: int = field(default=0, metadata={"help": "0: all records"})
    think: str = field(default="template", metadata={"help": "SFT think: 'none' (answer only) or 'template'"})
    blank_images: bool = field(default=False, metadata={"help": "control: train on black images"})
    max_boxes: int = field(default=4, metadata={"help": "most boxes an answer may hold (format reward)"})
    resume: str = field(default="auto", metadata={"help": "auto (latest checkpoint in output_dir) | never | a checkpoint path"})


@dataclass
class PolicyArguments:
    """The policy: base Qwen2.5-VL or Qwen3-VL, optional starting adapter, LoRA settings, answer format."""

    model_name_or_path: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "hub id, folder, 'tiny' or 'tiny-qwen3'"})
    tiny_model_dir: str = field(default="runs/tiny-qwen", metadata={"help": "where the tiny fixture is built when model is 'tiny'"})
    adapter_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapter to start from (the SFT output for GRPO)"})
    use_lora: bool = field(default=True, metadata={"help": "LoRA (peft) on the language model; False: full fine-tuning"})
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_regex: str = field(
        default=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        metadata={"help": "modules that get LoRA (the vision tower stays frozen)"},
    )
    freeze_vision: bool = field(default=True, metadata={"help": "full fine-tuning: keep the vision tower frozen"})
    torch_dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16"})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "e.g. flash_attention_2 on GPU"})
    torch_threads: int = field(default=0, metadata={"help": ">0: torch.set_num_threads (1 is fastest for the tiny model on a busy CPU)"})
    answer_schema: str = field(default="medvolr1", metadata={"help": "medvolr1 ({slice, boxes}) | paper ([{slice, bbox_2d_list}])"})
    coordinates: str = field(
        default="auto", metadata={"help": "box coordinates: auto (the family's: pixels for Qwen2.5-VL, 0-1000 for Qwen3-VL) | pixels | norm1000"}
    )


@dataclass
class RewardArguments:
    """Reward weights, their definitions (ours or the release's) and the frozen propagator of the coherence reward.

    With reward_mode "release" the four weights apply to the release's format, time, space and consistency
    terms (in that order) and coherence_window is its +-window (5 in the release)."""

    reward_mode: str = field(default="ours", metadata={"help": "ours | release (the MedVol-R1 release's definitions)"})
    release_variant: str = field(default="ctorg", metadata={"help": "reward_mode release: ctorg (with consistency) | kits23 (without)"})
    reward_format: float = 0.25
    reward_slice: float = 0.5
    reward_grounding: float = 1.0
    reward_coherence: float = 1.0
    coherence_propagator: str = field(default="none", metadata={"help": "none | litemedsam | medsam2"})
    coherence_window: int = field(default=8, metadata={"help": "+-W slices propagated for coherence (-1: whole volume)"})
    sam_checkpoint: Optional[str] = field(default=None, metadata={"help": "MedSAM2 checkpoint for coherence"})
    slice_source: str = field(default="auto", metadata={"help": "slice reward: auto | area | oracle"})


def stage_argv(stage: str, argv: list[str]) -> list[str]:
    """One YAML for the whole chain: sections `common`, `prepare`, `sft`, `grpo`, `evaluate`.

    `--config FILE` is replaced by a temporary flat YAML holding `common` merged with this stage's
    section, so trl's TrlParser reads it (and command-line flags still override it).
    """
    import tempfile

    import yaml

    argv = list(argv)
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    path = argv[at + 1]
    with open(path) as handle:
        full = yaml.safe_load(handle) or {}
    if not isinstance(full, dict):
        raise ValueError(f"{path}: the config must be a YAML mapping")
    sections = {"common", "prepare", "sft", "grpo", "evaluate", "env"}
    if not set(full) <= sections:
        raise ValueError(f"{path}: unknown top-level keys {sorted(set(full) - sections)}; use sections {sorted(sections)}")
    flat = {**(full.get("common") or {}), **(full.get(stage) or {})}
    if full.get("env"):
        flat["env"] = full["env"]
    handle = tempfile.NamedTemporaryFile("w", suffix=f".{stage}.yaml", delete=False)
    with handle:
        yaml.safe_dump(flat, handle)
    return argv[:at] + ["--config", handle.name] + argv[at + 2 :]
