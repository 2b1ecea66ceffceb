"""GPU benchmark of one grounding query with a Qwen2.5-VL-3B- or Qwen3-VL-4B-sized model (random weights, no download).

Families (--family): qwen2.5-vl (default: 16 views of 448 px = 256 image tokens per view, 128 new tokens) or
qwen3-vl (the MedVol-R1 release's setting: Qwen3-VL-4B, 64 views of 256 px = 64 image tokens per view,
256 new tokens, answers in the paper's schema in 0-1000).  What it measures (bf16):
  * prefill time (vision tower + prompt forward, first token),
  * decode throughput for N new tokens (min_new_tokens forces all N: random weights may hit EOS),
  * the whole `Grounder.ground` call (render + prompt + generate + parse; it ends in GroundingError
    because random weights say nothing valid; its timings are what we report),
  * peak CUDA memory of each phase.
Random weights give real compute cost but say nothing about accuracy.

    python bench/gpu_bench_qwen.py                       # on a CUDA machine, a few minutes on one H100
    python bench/gpu_bench_qwen.py --family qwen3-vl     # Qwen3-VL-4B-sized, 64 views at 256 px + 256 new tokens
    python bench/gpu_bench_qwen.py --tiny [--family qwen3-vl]   # CPU smoke check of this script (tiny model)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedVolR1Lib.anchor import AnswerFormat  # noqa: E402
from MedVolR1Lib.fixtures.tiny_qwen import (  # noqa: E402
    FAMILY_FIXTURES,
    _build_processor,
    _build_tokenizer,
    qwen3_vl_config,
    tiny_qwen3_vl_config,
    tiny_qwen_config,
)
from MedVolR1Lib.grounder import GenerationSettings, Grounder, GroundingError  # noqa: E402
from MedVolR1Lib.views import render_views  # noqa: E402
from MedVolR1Lib.volume import volume_from_array  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct's released config.json (sizes only; token ids come from our tokenizer).
QWEN2_5_VL_3B = {
    "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
}
# Qwen2.5-VL's own processor limits: a 448 px view stays 448 px (32x32 patches -> 256 tokens).
REAL_MIN_PIXELS, REAL_MAX_PIXELS = 3136, 12845056
# Qwen/Qwen3-VL-4B-Instruct's released config.json (sizes only; token ids come from our tokenizer).
QWEN3_VL_4B = {
    "text": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
    "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                   hidden_act="gelu_pytorch_tanh"),
}
# Qwen3-VL's processor limits (preprocessor_config.json): a 256 px view stays 256 px (16x16 patches -> 64 tokens).
QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS = 65536, 16777216
# Per family: defaults of this bench (qwen3-vl: the release's 64 views at 256 px, 256 new tokens) and answer format.
FAMILY_DEFAULTS = {
    "qwen2.5-vl": dict(views=16, image_size=448, new_tokens=128, answer_format=AnswerFormat("medvolr1", "pixels")),
    "qwen3-vl": dict(views=64, image_size=256, new_tokens=256, answer_format=AnswerFormat("paper", "norm1000")),
}


def build_random_model(family: str, tiny: bool, device, dtype, attn: str):
    """(model, processor, config): random weights of the real size (or the tiny fixture's) for `family`, built in memory."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    tokenizer = _build_tokenizer()
    if family == "qwen3-vl":
        _, tiny_min, tiny_max = FAMILY_FIXTURES[family]
        low, high = (tiny_min, tiny_max) if tiny else (QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS)
        config = tiny_qwen3_vl_config(tokenizer) if tiny else qwen3_vl_config(tokenizer, QWEN3_VL_4B["text"], QWEN3_VL_4B["vision"])
        model_class = Qwen3VLForConditionalGeneration
    else:
        _, tiny_min, tiny_max = FAMILY_FIXTURES[family]
        low, high = (tiny_min, tiny_max) if tiny else (REAL_MIN_PIXELS, REAL_MAX_PIXELS)
        config = tiny_qwen_config(tokenizer) if tiny else qwen_3b_config(tokenizer)
        model_class = Qwen2_5_VLForConditionalGeneration
    processor = _build_processor(tokenizer, low, high, family)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    return model, processor, config


def qwen_3b_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = dict(QWEN2_5_VL_3B["text"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN2_5_VL_3B["vision"]), image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def phantom_volume(slices: int = 96, size: int = 256):
    """Body-shaped CT-like phantom (no download): an ellipse of soft tissue with two 'organs'."""
    k, j, i = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    body = ((i - size / 2) / (0.42 * size)) ** 2 + ((j - size / 2) / (0.32 * size)) ** 2 < 1
    array = np.where(body, 40.0, -1000.0).astype(np.float32)
    organ = ((i - 0.35 * size) / 30) ** 2 + ((j - 0.45 * size) / 25) ** 2 + ((k - slices / 2) / 20) ** 2 < 1
    array[organ] = 120.0
    return volume_from_array(array, np.diag([-1.5, -1.5, 3.0, 1.0]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke check of this script")
    parser.add_argument("--family", default="qwen2.5-vl", choices=sorted(FAMILY_DEFAULTS))
    parser.add_argument("--views", type=int, default=None, help="default 16 (qwen2.5-vl) / 64 (qwen3-vl)")
    parser.add_argument("--image-size", type=int, default=None, help="default 448 (qwen2.5-vl) / 256 (qwen3-vl)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (qwen2.5-vl) / 256 (qwen3-vl); 16 with --tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager | flash_attention_2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    defaults = FAMILY_DEFAULTS[args.family]
    args.views = args.views or defaults["views"]
    args.image_size = args.image_size or defaults["image_size"]
    new_tokens = args.new_tokens or (16 if args.tiny else defaults["new_tokens"])

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("gpu_bench_qwen: CUDA is not available (torch {} , CUDA build {}). Run it on a GPU machine, "
                  "or pass --tiny for a CPU smoke check.".format(torch.__version__, torch.version.cuda), file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16

    from transformers import GenerationConfig

    t0 = time.perf_counter()
    model, processor, config = build_random_model(args.family, args.tiny, device, dtype, args.attn)
    model.eval()
    sync(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"model: {params / 1e9:.3f} B parameters, {dtype}, {device}, attn={args.attn}, built in {build_s:.1f} s, "
          f"weights {weights_gib:.2f} GiB")

    name = {"qwen2.5-vl": "random-qwen2.5-vl-3b", "qwen3-vl": "random-qwen3-vl-4b"}[args.family]
    grounder = Grounder(model, processor, model_ref=name if not args.tiny else f"random-tiny-{args.family}", device=device, dtype=dtype,
                        answer_format=defaults["answer_format"])
    volume = phantom_volume()
    views = render_views(volume, num_views=args.views, image_size=args.image_size)
    inputs = grounder.build_inputs(views, "segment the liver")
    prompt_tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    print(f"prompt: {len(views.slices)} views of {args.image_size} px -> {prompt_tokens} tokens ({image_tokens} image tokens)")

    def gen(n: int):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=config.text_config.eos_token_id,
                               pad_token_id=config.text_config.pad_token_id)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=cfg)
        sync(device)
        assert out.shape[1] - prompt_tokens == n, "generation stopped early"
        return time.perf_counter() - start

    gen(4)  # warm-up (kernels, allocator)
    prefill, full = [], []
    reset_peak(device)
    for _ in range(args.repeats):
        prefill.append(gen(1))
    prefill_peak = peak_gib(device)
    reset_peak(device)
    for _ in range(args.repeats):
        full.append(gen(new_tokens))
    generate_peak = peak_gib(device)
    prefill_s, full_s = float(np.median(prefill)), float(np.median(full))
    decode_tps = (new_tokens - 1) / max(full_s - prefill_s, 1e-9)

    reset_peak(device)
    settings = GenerationSettings(max_new_tokens=new_tokens, retries=0)
    try:
        result = grounder.ground(volume, "segment the liver", num_views=args.views, image_size=args.image_size, settings=settings)
        ground_timings, outcome = result.timings, "anchor (unexpected for random weights)"
    except GroundingError as exc:
        ground_timings, outcome = exc.result.timings, f"GroundingError ({exc.reason}), as expected for random weights"
    ground_peak = peak_gib(device)

    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "family": args.family,
        "answer_format": defaults["answer_format"].spec,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters_b": round(params / 1e9, 3),
        "views": len(views.slices),
        "image_size": args.image_size,
        "prompt_tokens": prompt_tokens,
        "image_tokens": image_tokens,
        "new_tokens": new_tokens,
        "prefill_s": round(prefill_s, 3),
        "query_s": round(full_s, 3),
        "decode_tokens_per_s": round(decode_tps, 1),
        "end_to_end_tokens_per_s": round(new_tokens / full_s, 1),
        "prefill_share_of_query": round(prefill_s / full_s, 3),
        "peak_gib_prefill": round(prefill_peak, 2),
        "peak_gib_generate": round(generate_peak, 2),
        "ground_call_s": round(ground_timings["total_s"], 3),
        "ground_call_generate_s": round(ground_timings["generate_s"], 3),
        "ground_call_render_s": round(ground_timings["render_s"], 3),
        "ground_call_prompt_s": round(ground_timings["prompt_s"], 3),
        "ground_call_new_tokens": ground_timings["new_tokens"],
        "peak_gib_ground_call": round(ground_peak, 2),
        "ground_outcome": outcome,
        "repeats": args.repeats,
    }
    print(f"prefill {prefill_s:.3f} s; query (prefill + {new_tokens} tokens) {full_s:.3f} s; "
          f"decode {decode_tps:.1f} tok/s; prefill is {100 * prefill_s / full_s:.0f}% of the query")
    print(f"peak memory: prefill {prefill_peak:.2f} GiB, generate {generate_peak:.2f} GiB, ground() {ground_peak:.2f} GiB")
    print(f"ground(): {ground_timings['total_s']:.3f} s (render {ground_timings['render_s']:.3f}, prompt {ground_timings['prompt_s']:.3f}, "
          f"generate {ground_timings['generate_s']:.3f}, {ground_timings['new_tokens']} tokens) -> {outcome}")
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
