"""Merge an SFT adapter into its base model and save a full model folder (the release's GRPO start).

The release trains GRPO from the merged SFT model: a new LoRA on it for CT-ORG, all weights for KiTS23.
The merged folder carries the adapter's manifest (stage "merged") so later stages keep its answer format
and evaluation finds a loadable base model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError
from .checkpoints import read_manifest, write_manifest


def merge_adapter(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None, dtype: str = "auto"
) -> Path:
    """Write base + adapter, merged, to `out_dir` (atomically: a sibling temp folder renamed into place).

    `base_model` defaults to the base the adapter's manifest names."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (expected an SFT output folder)")
    info = read_manifest(adapter_dir)
    base = base_model or info.get("base_model")
    if not base:
        raise CheckpointError(f"{adapter_dir}: its manifest names no base model; pass --base_model")
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} exists; remove it or choose another --out_dir")
    torch_dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be auto, bfloat16 or float32, got {dtype!r}")
    try:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch_dtype, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(adapter_dir if (adapter_dir / "preprocessor_config.json").exists() else base,
                                                  trust_remote_code=False)
        merged = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    except OSError as exc:
        raise CheckpointError(f"cannot merge {adapter_dir} into {base!r}: {exc}") from exc
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        keep = {k: info[k] for k in ("family", "coordinates", "answer_schema") if k in info}
        write_manifest(tmp, stage="merged", base_model=str(base), merged_adapter=str(adapter_dir), lora=False, **keep)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
