"""Load the policy (Qwen2.5-VL or Qwen3-VL + processor), attach LoRA or a starting adapter, freeze the vision tower.

`policy_answer_format` fixes the one answer format (schema + box coordinates) of a run: the family's
coordinates unless set, and the starting adapter's own when there is one (a mismatch is refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..anchor import AnswerFormat
from ..errors import CheckpointError
from ..families import ModelFamily, check_adapter_convention, family_of_checkpoint, resolve_coordinates
from .config import PolicyArguments, tiny_model_path


def resolve_model_path(args: PolicyArguments) -> str:
    """'tiny' / 'tiny-qwen3' (and -small) build (or reuse) an offline tiny fixture; anything else is passed through."""
    return tiny_model_path(args.model_name_or_path, args.tiny_model_dir) or args.model_name_or_path


def policy_answer_format(args: PolicyArguments, model_path: str) -> tuple[ModelFamily, AnswerFormat]:
    """(family, answer format) of this run; CheckpointError if the starting adapter (or the merged model) was
    trained otherwise."""
    from .checkpoints import read_manifest

    family = family_of_checkpoint(model_path)
    fmt = AnswerFormat(args.answer_schema, resolve_coordinates(family, args.coordinates))
    if args.adapter_path:
        check_adapter_convention(read_manifest(args.adapter_path), family, fmt.coordinates, f"adapter {args.adapter_path}", fmt.schema)
    # a merged SFT model (Training/merge_adapter.py) carries its adapter's manifest: the same check applies
    check_adapter_convention(read_manifest(model_path), family, fmt.coordinates, f"model {model_path}", fmt.schema)
    return family, fmt


def _dtype(name: str, use_cpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and not use_cpu else torch.float32
    if not hasattr(torch, name):
        raise ValueError(f"unknown torch dtype {name!r}")
    return getattr(torch, name)


def load_policy(args: PolicyArguments, *, use_cpu: bool = False, gradient_checkpointing: bool = False):
    """(model, processor, model_path): LoRA-wrapped (new, or the starting adapter made trainable) or full."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    path = resolve_model_path(args)
    kwargs = {"dtype": _dtype(args.torch_dtype, use_cpu), "trust_remote_code": False}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise CheckpointError(f"cannot load the policy from {path!r}: {exc}") from exc
    if gradient_checkpointing:
        model.config.use_cache = False
    if args.adapter_path:
        from peft import PeftModel

        if not (Path(args.adapter_path) / "adapter_config.json").exists():
            raise CheckpointError(f"{args.adapter_path}: no adapter_config.json (expected the SFT output folder)")
        model = PeftModel.from_pretrained(model, args.adapter_path, is_trainable=True)
    elif args.use_lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_regex,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif args.freeze_vision:
        for name, param in model.named_parameters():
            if ".visual." in f".{name}" or name.startswith("visual") or "vision_tower" in name:
                param.requires_grad_(False)
    return model, processor, path


def trainable_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
