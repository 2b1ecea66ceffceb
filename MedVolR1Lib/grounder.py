"""The VLM grounder: Qwen2.5-VL or Qwen3-VL (+ optional LoRA) turns K labelled slices and a query into an evidence anchor.

Flow of `Grounder.ground`: render the views (views.render_views) -> chat messages with the images
(views.build_messages) -> the checkpoint's own chat template and processor -> `generate` -> decode only
the new tokens -> strict parse (anchor.parse_answer + answer_problems) -> voxel anchor through the
exact view geometry.  Model garbage never becomes an anchor: after the retries it raises a typed
`GroundingError` that keeps the raw text, so the UI can show what the model said.

Loading goes through AutoProcessor / AutoModelForImageTextToText with trust_remote_code=False, so any
Qwen2.5-VL or Qwen3-VL folder (the hub release, our fine-tunes, the offline tiny fixtures) works the same.
The answer format (schema + box coordinates) comes from the adapter's training manifest, else from the
family (pixels for Qwen2.5-VL, 0-1000 for Qwen3-VL); an adapter is refused with any other convention.
torch/transformers are imported lazily: the dataclasses here are importable without them.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .anchor import AnswerFormat, AnswerRules, EvidenceAnchor, ParsedAnswer, ParseFailure, PixelBox, answer_problems, parse_model_answer
from .errors import AnchorError, CheckpointError, DeviceError, MedVolR1Error
from .families import ModelFamily, check_adapter_convention, family_of_checkpoint, family_of_model_type, resolve_coordinates
from .progress import ProgressCallback, report
from .views import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_VIEWS, SliceViews, ViewGeometry, build_messages, render_views

if TYPE_CHECKING:  # pragma: no cover
    from .volume import Volume
    from .windowing import Window

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OOM_ADVICE = (
    "show fewer views (num_views=8), render smaller views (image_size=336 or 280), "
    "or load the model in 4-bit (quantize='4bit', needs the bitsandbytes package)"
)


class GroundingError(MedVolR1Error):
    """The model's output could not be turned into a valid anchor after all attempts.

    `reason` is the ParseFailure reason ("missing_answer_tags", "invalid_json", ...) or
    "invalid_answer" / "anchor_error" for answers that parse but do not fit; `raw_text` is the
    first (deterministic) candidate's text; `candidates` lists every attempt; `result` is the
    GroundingResult with `anchor=None`, for display.
    """

    def __init__(self, message: str, *, reason: str, raw_text: str, candidates: Sequence["Candidate"] = (), result: Optional["GroundingResult"] = None):
        super().__init__(message)
        self.reason = reason
        self.raw_text = raw_text
        self.candidates = list(candidates)
        self.result = result


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode.  Greedy by default (reproducible); sampling only on retry unless asked for.

    num_candidates > 1 returns several sequences per attempt (beam search when greedy, independent
    samples when sampling); the first valid one wins.  After an attempt with no valid candidate,
    up to `retries` more attempts sample at `retry_temperature`.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    num_candidates: int = 1
    retries: int = 2
    retry_temperature: float = 0.8
    max_boxes: int = 4
    require_think: bool = False
    seed: Optional[int] = 0
    lenient: bool = False  # also accept the family's native grounding JSON (off-the-shelf models; never in training)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_candidates < 1 or self.retries < 0 or self.max_boxes < 1:
            raise ValueError("num_candidates and max_boxes must be >= 1 and retries >= 0")
        if not (self.temperature > 0 and self.retry_temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("temperatures must be > 0 and top_p in (0, 1]")


@dataclass(frozen=True)
class Candidate:
    """One decoded output and why it was rejected (failure None = accepted)."""

    text: str
    attempt: int
    sampled: bool
    new_tokens: int
    failure: Optional[str] = None
    detail: str = ""


@dataclass
class GroundingResult:
    """What the grounder saw and said, and the anchor it implies (None only when returned on failure)."""

    anchor: Optional[EvidenceAnchor]
    answer: Optional[ParsedAnswer]
    reasoning: str
    raw_text: str
    query: str
    slices: tuple[int, ...]
    pixel_boxes: list[PixelBox]  # boxes of `anchor` (clipped to the volume) in rendered-view pixels of its slice
    geometry: ViewGeometry
    window: Any
    candidates: list[Candidate] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    model_frame: Optional[tuple[int, int]] = None  # (height, width) the processor resized each view to
    failure: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.anchor is not None

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "anchor": self.anchor.to_dict() if self.anchor is not None else None,
            "pixel_boxes": [list(b) for b in self.pixel_boxes],
            "reasoning": self.reasoning,
            "raw_text": self.raw_text,
            "slices_shown": list(self.slices),
            "image_size": self.geometry.image_size,
            "model_frame": list(self.model_frame) if self.model_frame else None,
            "attempts": [c.__dict__ for c in self.candidates],
            "timings": dict(self.timings),
            "failure": self.failure,
        }


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~", "\\")) or "\\" in ref or ref.count("/") > 1 or bool(re.match(r"^[A-Za-z]:", ref))


def _resolve_source(ref: Union[str, Path], what: str) -> tuple[str, Optional[Path]]:
    """(reference for from_pretrained, local folder or None for a hub id); CheckpointError when missing."""
    text = str(ref).strip()
    if not text:
        raise CheckpointError(f"no {what} given: pass a local folder or a Hugging Face hub id")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{what} {path} is a file; pass the checkpoint folder that contains it")
        return str(path.resolve()), path.resolve()
    if isinstance(ref, Path) or _looks_like_path(text) or not _HUB_ID.match(text):
        raise CheckpointError(
            f"{what} folder {path} does not exist: pass an existing checkpoint folder "
            "(or a Hugging Face hub id such as Qwen/Qwen2.5-VL-3B-Instruct where the hub is reachable)"
        )
    return text, None


def _hub_error(ref: str, what: str, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"could not load {what} '{ref}': it is not a local folder, and loading it from the Hugging Face hub failed "
        f"({type(exc).__name__}: {str(exc)[:300]}). The hub is only reachable with network access; otherwise download it "
        f"elsewhere (`hf download {ref} --local-dir DIR`) and pass DIR"
    )


def _local_snapshot(ref: str) -> Optional[Path]:
    """Where a hub checkpoint sits in the local HF cache (for fingerprints); None if unknown."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # noqa: BLE001 - provenance is best effort for hub ids
        return None


def weights_fingerprint(folder: Optional[Path], chunk: int = 1 << 20) -> Optional[str]:
    """A short, fast fingerprint of a checkpoint's weight files, for provenance in outputs.

    Hashes each weight file's name, size, first and last MiB (the safetensors header names every
    tensor, dtype, shape and offset), not the whole multi-GB payload: it tells checkpoints apart,
    it is not an integrity checksum.
    """
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(chunk))
            if size > 2 * chunk:
                handle.seek(size - chunk)
                digest.update(handle.read(chunk))
            else:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


class _ProgressCriterion:
    """A generate() stopping criterion that never stops: it reports progress per token, and lets a
    progress callback that raises Cancelled abort generation between two tokens."""

    def __init__(self, progress: ProgressCallback, start: float, span: float, prompt_len: int, max_new: int, label: str):
        self.progress, self.start, self.span = progress, start, span
        self.prompt_len, self.max_new, self.label = prompt_len, max_new, label

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = int(input_ids.shape[1]) - self.prompt_len
        report(self.progress, self.start + self.span * done / self.max_new, f"{self.label}: {done}/{self.max_new} tokens")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Grounder:
    """A loaded VLM + processor that answers grounding queries on volumes."""

    def __init__(
        self,
        model,
        processor,
        *,
        model_ref: str = "<in-memory>",
        model_path: Optional[Path] = None,
        adapter_ref: Optional[str] = None,
        adapter_path: Optional[Path] = None,
        device=None,
        dtype=None,
        settings: Optional[GenerationSettings] = None,
        answer_format: Optional[AnswerFormat] = None,
    ):
        """Wrap an already-built model and processor (tests, benchmarks, trainers); most callers use from_pretrained.

        Without `answer_format` the family's own convention is used (our schema, pixels or 0-1000).
        """
        self.model = model.eval()
        self.family: Optional[ModelFamily] = None
        try:
            self.family = family_of_model_type(getattr(model.config, "model_type", None))
        except CheckpointError:
            if answer_format is None:
                raise
        self.answer_format = answer_format or AnswerFormat("medvolr1", self.family.coordinates)  # type: ignore[union-attr]
        self.processor = processor
        self.model_ref = model_ref
        self.model_path = model_path
        self.adapter_ref = adapter_ref
        self.adapter_path = adapter_path
        self.device = device if device is not None else next(model.parameters()).device
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype
        self.settings = settings or GenerationSettings()
        self._fingerprints: Optional[tuple] = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, Path],
        adapter: Union[str, Path, None] = None,
        device: str = "auto",
        dtype=None,
        *,
        quantize: Optional[str] = None,
        settings: Optional[GenerationSettings] = None,
        coordinates: str = "auto",
        answer_schema: Optional[str] = None,
    ) -> "Grounder":
        """Load a Qwen2.5-VL / Qwen3-VL checkpoint (local folder or hub id) and optionally a PEFT LoRA adapter.

        The answer format is the one the adapter (or a full fine-tune) was trained with, from its
        training manifest; `coordinates` / `answer_schema` given explicitly must agree with it
        (CheckpointError otherwise), and set the format of a model that has no manifest.

        device: "auto" (CUDA bf16 if present, else CPU float32) | "cpu" | "cuda[:N]".  quantize="4bit"
        loads the base model with bitsandbytes NF4 (CUDA only).  The adapter is merged into the
        weights for speed unless the model is quantized.
        """
        from .devices import is_out_of_memory, out_of_memory_error, resolve_device

        choice = resolve_device(device, dtype)
        model_ref, model_path = _resolve_source(model, "model")
        if model_path is not None and not (model_path / "config.json").is_file():
            raise CheckpointError(f"model folder {model_path} has no config.json: it is not a transformers checkpoint folder")
        adapter_ref = adapter_path = None
        if adapter is not None:
            adapter_ref, adapter_path = _resolve_source(adapter, "adapter")
            if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
                raise CheckpointError(f"adapter folder {adapter_path} has no adapter_config.json: it is not a PEFT adapter folder")

        answer_format = _answer_format_for(model_ref, adapter_path, coordinates, answer_schema)

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs: dict = {"trust_remote_code": False, "dtype": choice.dtype}
        if quantize is not None:
            kwargs["quantization_config"] = _quantization_config(quantize, choice)
        if choice.is_cuda:
            kwargs["device_map"] = {"": str(choice.device)}
        try:
            processor = AutoProcessor.from_pretrained(model_ref, trust_remote_code=False)
            net = AutoModelForImageTextToText.from_pretrained(model_ref, **kwargs)
            if not choice.is_cuda:
                net = net.to(choice.device)
            if adapter_ref is not None:
                net = _apply_adapter(net, adapter_ref, merge=quantize is None)
        except CheckpointError:
            raise
        except (OSError, ValueError) as exc:
            if model_path is None:
                raise _hub_error(model_ref, "model", exc) from exc
            raise CheckpointError(f"could not load the checkpoint {model_path}: {type(exc).__name__}: {str(exc)[:400]}") from exc
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if is_out_of_memory(exc):
                raise out_of_memory_error(f"loading {model_ref}", OOM_ADVICE) from exc
            raise
        return cls(
            net,
            processor,
            model_ref=str(model),
            model_path=model_path or _local_snapshot(model_ref),
            adapter_ref=None if adapter is None else str(adapter),
            adapter_path=adapter_path or (None if adapter_ref is None else _local_snapshot(adapter_ref)),
            device=choice.device,
            dtype=choice.dtype,
            settings=settings,
            answer_format=answer_format,
        )

    # ------------------------------------------------------------------ provenance
    def describe(self) -> dict:
        """Model / adapter identity for output provenance (fingerprints are cached after the first call)."""
        if self._fingerprints is None:
            self._fingerprints = (weights_fingerprint(self.model_path), weights_fingerprint(self.adapter_path))
        return {
            "model": self.model_ref,
            "model_path": str(self.model_path) if self.model_path else None,
            "model_fingerprint": self._fingerprints[0],
            "adapter": self.adapter_ref,
            "adapter_path": str(self.adapter_path) if self.adapter_path else None,
            "adapter_fingerprint": self._fingerprints[1],
            "architecture": type(self.model).__name__,
            "answer_format": self.answer_format.spec,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "generation": dict(self.settings.__dict__),
        }

    # ------------------------------------------------------------------ prompting
    def build_inputs(self, views: SliceViews, query: str):
        """Tokenised model inputs (on the model's device) for one query over rendered views.

        The same path the trainers use: build_messages -> the checkpoint's chat template -> processor.
        """
        images = views.pil_images()
        messages = build_messages(views.slices, query, views.geometry.image_size, images=images, answer_format=self.answer_format)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _generation_config(self, settings: GenerationSettings, sample: bool, temperature: float):
        from transformers import GenerationConfig

        base = self.model.generation_config
        eos = base.eos_token_id if base.eos_token_id is not None else self.processor.tokenizer.eos_token_id
        pad = base.pad_token_id if base.pad_token_id is not None else self.processor.tokenizer.pad_token_id
        n = settings.num_candidates
        config = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad, num_return_sequences=n)
        if sample:
            config.update(do_sample=True, temperature=temperature, top_p=settings.top_p, top_k=0)
        else:
            config.update(do_sample=False, num_beams=n if n > 1 else 1)
        return GenerationConfig(**config)

    # ------------------------------------------------------------------ grounding
    def ground(
        self,
        volume: "Volume",
        query: str,
        *,
        slices: Optional[Sequence[int]] = None,
        num_views: int = DEFAULT_NUM_VIEWS,
        image_size: int = DEFAULT_IMAGE_SIZE,
        window: Union[None, str, "Window", tuple] = None,
        progress: Optional[ProgressCallback] = None,
        settings: Optional[GenerationSettings] = None,
        raise_on_failure: bool = True,
    ) -> GroundingResult:
        """Answer `query` on `volume`: the key slice and boxes as a validated voxel EvidenceAnchor.

        Raises GroundingError if no attempt yields a valid answer (unless raise_on_failure=False,
        then the result has anchor=None and `failure` set), DeviceError on GPU out-of-memory, and
        Cancelled if the progress callback raises it.
        """
        import torch

        from .devices import is_out_of_memory, out_of_memory_error

        settings = settings or self.settings
        if self.answer_format.coordinates == "pixels" and self.family is not None:
            self.family.check_image_size(image_size)  # absolute pixels only mean something on the model's patch grid
        t_start = time.perf_counter()
        report(progress, 0.0, "rendering slice views")
        views = render_views(volume, slices, num_views=num_views, image_size=image_size, window=window)
        t_render = time.perf_counter()
        report(progress, 0.05, f"preparing the prompt ({len(views.slices)} views)")
        inputs = self.build_inputs(views, query)
        prompt_len = int(inputs["input_ids"].shape[1])
        frame = None
        if "image_grid_thw" in inputs and len(inputs["image_grid_thw"]):
            patch = getattr(self.processor.image_processor, "patch_size", 14)
            _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
            frame = (gh * patch, gw * patch)
        image_token = getattr(self.model.config, "image_token_id", None)
        image_tokens = int((inputs["input_ids"] == image_token).sum()) if image_token is not None else 0
        t_prompt = time.perf_counter()

        rules = AnswerRules(image_size=image_size, shown_slices=tuple(views.slices), max_boxes=settings.max_boxes)
        attempts = 1 + settings.retries
        candidates: list[Candidate] = []
        accepted: Optional[tuple[ParsedAnswer, EvidenceAnchor, Candidate]] = None
        generate_s = 0.0
        for attempt in range(attempts):
            sample = settings.do_sample or attempt > 0
            temperature = settings.temperature if attempt == 0 else settings.retry_temperature
            if sample and settings.seed is not None:
                torch.manual_seed(settings.seed + attempt)
            span = 0.9 / attempts
            label = "generating" if attempt == 0 else f"retry {attempt}/{settings.retries} (sampling)"
            criterion = _ProgressCriterion(progress, 0.1 + span * attempt, span, prompt_len, settings.max_new_tokens, label)
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    output = self.model.generate(
                        **inputs,
                        generation_config=self._generation_config(settings, sample, temperature),
                        stopping_criteria=[criterion] if progress is not None else None,
                    )
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                if is_out_of_memory(exc):
                    raise out_of_memory_error(
                        f"grounding with {len(views.slices)} views of {image_size} px ({prompt_len} prompt tokens)", OOM_ADVICE
                    ) from exc
                raise
            generate_s += time.perf_counter() - t0
            new_ids = output[:, prompt_len:]
            texts = self.processor.batch_decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            pad = self.processor.tokenizer.pad_token_id
            for row, text in zip(new_ids, texts):
                count = int((row != pad).sum()) if pad is not None else int(row.numel())
                outcome = _check(text.strip(), rules, views.geometry, volume.num_slices, settings, self.answer_format)
                if isinstance(outcome[0], ParsedAnswer):
                    candidate = Candidate(text.strip(), attempt, sample, count)
                    candidates.append(candidate)
                    if accepted is None:
                        accepted = (outcome[0], outcome[1], candidate)
                else:
                    candidates.append(Candidate(text.strip(), attempt, sample, count, failure=outcome[0], detail=outcome[1]))
            if accepted is not None:
                break

        timings = {
            "render_s": t_render - t_start,
            "prompt_s": t_prompt - t_render,
            "generate_s": generate_s,
            "total_s": time.perf_counter() - t_start,
            "prompt_tokens": prompt_len,
            "image_tokens": image_tokens,
            "new_tokens": sum(c.new_tokens for c in candidates),
            "attempts": 1 + max(c.attempt for c in candidates),
        }
        common = dict(query=query, slices=tuple(views.slices), geometry=views.geometry, window=views.window,
                      candidates=candidates, timings=timings, model_frame=frame)
        if accepted is not None:
            answer, anchor, candidate = accepted
            report(progress, 1.0, f"evidence: slice {anchor.slice_index}, {len(anchor.boxes)} box(es)")
            return GroundingResult(anchor=anchor, answer=answer, reasoning=answer.think, raw_text=candidate.text,
                                   pixel_boxes=views.geometry.pixel_boxes(anchor), **common)

        first = candidates[0]
        result = GroundingResult(anchor=None, answer=None, reasoning="", raw_text=first.text, pixel_boxes=[],
                                 failure=first.failure, **common)
        report(progress, 1.0, "no valid answer from the model")
        if not raise_on_failure:
            return result
        shown = first.text if len(first.text) <= 300 else first.text[:300] + "..."
        raise GroundingError(
            f"the model gave no usable answer in {timings['attempts']} attempt(s) ({len(candidates)} candidate(s)); "
            f"first: {first.failure}{': ' + first.detail if first.detail else ''}. Raw output: {shown!r}",
            reason=first.failure or "unknown",
            raw_text=first.text,
            candidates=candidates,
            result=result,
        )


def _answer_format_for(model_ref: str, adapter_path: Optional[Path], coordinates: str, schema: Optional[str]) -> AnswerFormat:
    """The format a checkpoint answers in: its training manifest's, checked against explicit requests."""
    from .training.checkpoints import read_manifest

    family = family_of_checkpoint(model_ref)
    requested = resolve_coordinates(family, coordinates)
    for folder, what in ((adapter_path, "adapter"), (Path(model_ref) if Path(model_ref).is_dir() else None, "model")):
        info = read_manifest(folder) if folder is not None else {}
        if not info.get("coordinates"):
            continue
        if coordinates in (None, "", "auto"):
            requested = info["coordinates"]
        check_adapter_convention(info, family, requested, f"{what} {folder}", schema)
        schema = schema or info.get("answer_schema")
        break
    return AnswerFormat(schema or "medvolr1", requested)


def _check(text: str, rules: AnswerRules, geometry: ViewGeometry, num_slices: int, settings: GenerationSettings, fmt: AnswerFormat):
    """(ParsedAnswer, EvidenceAnchor) if the text is a usable answer, else (reason, detail)."""
    parsed = parse_model_answer(text, fmt, rules.image_size, require_think=settings.require_think, strict_schema=False,
                                lenient=settings.lenient)
    if isinstance(parsed, ParseFailure):
        return (parsed.reason, "")
    problems = answer_problems(parsed, rules)
    if problems:
        return ("invalid_answer", "; ".join(problems))
    try:
        anchor = geometry.anchor_from_answer(parsed, num_slices)
    except AnchorError as exc:
        return ("anchor_error", str(exc))
    return (parsed, anchor)


def _quantization_config(quantize: str, choice):
    import importlib.util

    if quantize not in ("4bit", "8bit"):
        raise DeviceError(f"unknown quantize={quantize!r}: use '4bit' or '8bit' (or None)")
    if not choice.is_cuda:
        raise DeviceError(f"quantize={quantize!r} needs a CUDA GPU (bitsandbytes); on CPU load without quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DeviceError(f"quantize={quantize!r} needs the bitsandbytes package: pip install bitsandbytes")
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=choice.dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["visual", "lm_head"])


def _apply_adapter(model, adapter_ref: str, *, merge: bool):
    """Load a PEFT LoRA adapter on top of the base model (merged for inference speed when possible)."""
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency of the models extra
        raise CheckpointError("an adapter was given but the peft package is not installed: pip install peft") from exc
    try:
        wrapped = PeftModel.from_pretrained(model, adapter_ref, is_trainable=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not load the LoRA adapter {adapter_ref}: {type(exc).__name__}: {str(exc)[:400]}") from exc
    return wrapped.merge_and_unload() if merge else wrapped
