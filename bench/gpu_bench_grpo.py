"""GPU benchmark of one GRPO training step: Qwen2.5-VL-3B- or Qwen3-VL-4B-sized policy + MedSAM2 coherence reward (random weights).

--family qwen3-vl switches every default to the MedVol-R1 release's CT-ORG recipe (--recipe, default
Training/configs/ctorg-release.yaml, whose grpo section gives the learning rate, LoRA r128 with the vision tower,
G = 4, beta 0.01, the loss and the rewards: reward_mode release, format / time / space / MedSAM2 consistency at
0.25 each over +-5 slices): Qwen3-VL-4B, 64 views of 256 px, answers in the release's schema in 0-1000. The
recipe allows 2048 new tokens; the bench defaults to 256 so a step fits the device budget, and prints the
generation's tokens/s so a 2048-token step can be worked out. The defaults below are those of --family qwen2.5-vl.

What it runs (defaults; every number is a flag):
  * policy: a Qwen2.5-VL-3B-sized model built from its released config with RANDOM weights (no download; the
    same config as bench/gpu_bench_qwen.py), LoRA r=64 on the language model (vision tower frozen), bf16,
    gradient checkpointing, sdpa attention;
  * data: the real sample CT (MedVolR1Lib.sample_data) prepared by Training/prepare_data.py's code:
    16 views of 448 px (256 image tokens per view), targets liver / spleen / kidneys / stomach;
  * trl's GRPOTrainer: 8 rollouts per prompt, one prompt per step, max_completion_length 128, DAPO loss, beta 0;
  * rewards: format / slice / grounding + the coherence reward through MedSAM2Propagator with a real-size
    SAM2.1 hiera-tiny at 512 px (MedSAM2's config) and RANDOM weights, +-8 slices around the key slice.
Random weights give the real compute cost (shapes, kernels, completion length: random sampling over 151k ids
almost never hits EOS), never accuracy.

Prints, per GRPO step, the time split into generation / rewards (of which propagation) / loss forward / backward,
the first step (warm-up: kernels, SAM2 encoding of the volume) apart from the mean of the later ones, peak CUDA
memory of each phase, and the coherence reward's cost for a group of 8 rollouts vs one propagation.

    python bench/gpu_bench_grpo.py --sample-dir .device_carry/cache      # one CUDA GPU, a few minutes on an H100
    python bench/gpu_bench_grpo.py --sample-dir .device_carry/cache --family qwen3-vl
    python bench/gpu_bench_grpo.py --tiny                                # CPU smoke check (tiny Qwen, micro SAM2)

The GPU machine has no network: pass --sample-dir pointing at a copy of the sample cache (the folder that holds
sample_ct/, or sample_ct/ itself; bench/device_prepare.sh makes one in the repo tree). Without CUDA (and without
--tiny) it exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

TARGETS = "liver,spleen,kidneys,stomach"


def _recipes() -> dict:
    from MedVolR1Lib.anchor import AnswerFormat

    return {
        "qwen2.5-vl": dict(views=16, image_size=448, tiny_image_size=112, max_completion_length=128, window=8, lora_rank=64,
                           generations=8, beta=0.0, loss_type="dapo", learning_rate=1e-6, answer_format=AnswerFormat()),
        # the rest comes from the recipe's grpo section (--recipe, default Training/configs/ctorg-release.yaml)
        "qwen3-vl": dict(views=64, image_size=256, tiny_image_size=128, max_completion_length=256, window=5, lora_rank=128,
                         generations=4, beta=0.01, loss_type="grpo", learning_rate=1e-6, answer_format=AnswerFormat("paper", "norm1000"),
                         recipe="Training/configs/ctorg-release.yaml"),
    }


FAMILY_RECIPES = _recipes()
RECIPE_KEYS = ("learning_rate", "lora_rank", "lora_alpha", "lora_target_regex", "num_generations", "beta", "loss_type",
               "reward_mode", "release_variant", "reward_format", "reward_slice", "reward_grounding", "reward_coherence",
               "coherence_window")


def read_recipe(path: str) -> dict:
    """The GRPO settings the bench takes from a training config's grpo section (missing keys: the bench's own)."""
    import yaml

    file = Path(path) if Path(path).is_absolute() else BENCH_DIR.parent / path
    try:
        grpo = (yaml.safe_load(file.read_text()) or {}).get("grpo") or {}
    except OSError as exc:
        raise SystemExit(f"gpu_bench_grpo: cannot read --recipe {file}: {exc}")
    return {k: grpo[k] for k in RECIPE_KEYS if k in grpo}


# --------------------------------------------------------------------------------------------- timing helpers
class PhaseTimer:
    """Wraps methods to record each call's wall time (CUDA-synchronised) and, for top-level phases, the
    peak CUDA memory during the call. Phases that nest (propagation inside rewards) are timed but do not
    reset the peak counter, so the enclosing phase's peak stays right."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.peak_gib: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def wrap(self, obj, name: str, key: str, *, track_peak: bool = False, nested: str | None = None) -> None:
        """`nested`: a key timed inside this phase; its time per call of this phase goes to '<nested>_per_<key>'."""
        import torch

        original = getattr(obj, name)

        def timed(*args, **kwargs):
            self._sync()
            if track_peak and self.cuda:
                torch.cuda.reset_peak_memory_stats()
            inner_before = sum(self.calls[nested]) if nested else 0.0
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.calls[key].append(time.perf_counter() - start)
                if nested:
                    self.calls[f"{nested}_per_{key}"].append(sum(self.calls[nested]) - inner_before)
                if track_peak and self.cuda:
                    self.peak_gib[key] = max(self.peak_gib[key], torch.cuda.max_memory_allocated() / 2**30)

        setattr(obj, name, timed)


def resolve_sample_cache(sample_dir: str | None) -> str | None:
    """--sample-dir may name the cache root (holding sample_ct/) or sample_ct/ itself; returns MEDVOLR1_CACHE."""
    if not sample_dir:
        return None
    folder = Path(sample_dir).expanduser().resolve()
    if (folder / "example_ct.nii.gz").exists() and folder.name == "sample_ct":
        return str(folder.parent)
    if (folder / "sample_ct" / "example_ct.nii.gz").exists():
        return str(folder)
    raise SystemExit(
        f"gpu_bench_grpo: --sample-dir {folder} holds neither sample_ct/example_ct.nii.gz nor example_ct.nii.gz "
        "(copy the sample cache there first, e.g. with bench/device_prepare.sh)"
    )


# --------------------------------------------------------------------------------------------- the pieces
def build_policy(tiny: bool, device, dtype, attn: str, lora_rank: int, family: str = "qwen2.5-vl", *,
                 lora_alpha: int | None = None, lora_target_regex: str | None = None):
    """(model, processor): Qwen2.5-VL / Qwen3-VL from a config with random weights, then LoRA exactly as
    MedVolR1Lib.training.policy.load_policy attaches it (same PolicyArguments fields). Built in memory:
    saving and reloading 7 GB of random weights would only time the disk."""
    from peft import LoraConfig, get_peft_model

    from gpu_bench_qwen import build_random_model
    from MedVolR1Lib.training.config import PolicyArguments

    model, processor, _ = build_random_model(family, tiny, device, dtype, attn)
    model.config.use_cache = False  # as load_policy with gradient checkpointing; generation asks for the cache itself
    policy = PolicyArguments(model_name_or_path="random", lora_rank=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank)
    if lora_target_regex:
        policy.lora_target_regex = lora_target_regex
    lora = LoraConfig(r=policy.lora_rank, lora_alpha=policy.lora_alpha, lora_dropout=policy.lora_dropout,
                      target_modules=policy.lora_target_regex, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), processor


def build_sam_checkpoint(folder: Path, tiny: bool, sam_size: int) -> tuple[str, list[str]]:
    """Random-weight SAM2.1 hiera-tiny saved like MedSAM2_latest.pt: real size (MedSAM2's 512 px overrides only)
    on GPU, the micro fixture with --tiny. Returns (path, extra hydra overrides for the propagator)."""
    from MedVolR1Lib.fixtures.micro_sam2 import micro_sam2_overrides, save_random_sam2_checkpoint

    path = folder / ("micro_sam2.pt" if tiny else "random_sam2.1_hiera_t512.pt")
    overrides = micro_sam2_overrides(sam_size) if tiny else []
    save_random_sam2_checkpoint(path, overrides, seed=0)
    return str(path), overrides


def coherence_group_cost(data: Path, make_propagator, sync, window: int, group: int, repeats: int = 3, rewards=None,
                         answer_format=None) -> dict:
    """Fresh propagator: one prepare + one propagation, vs the coherence reward of a group of `group`
    rollouts of the same case (one prepare shared, `group` propagations).  A throwaway run warms kernels first;
    each side is timed `repeats` times, every time with a fresh propagator (nothing cached), and the best time
    of each is compared (the shared machines' load moves single timings by 20-30%)."""
    import numpy as np

    from MedVolR1Lib.anchor import format_answer
    from MedVolR1Lib.training.evaluate import oracle_guess
    from MedVolR1Lib.training.run import reward_functions
    from MedVolR1Lib.training.records import read_records
    from MedVolR1Lib.training.store import VolumeStore

    record = next(r for r in read_records(data / "train.jsonl") if r.target == "kidneys")
    store = VolumeStore.from_dir(data)
    volume = store.volume(record.case_id)
    anchor = oracle_guess(record).anchor
    k = anchor.slice_index
    z = (max(0, k - window), min(volume.num_slices - 1, k + window))

    def one_propagation():
        prop = make_propagator()
        sync()
        start = time.perf_counter()
        prop.prepare(volume)
        prop.propagate(anchor, merge=True, slice_range=z)
        sync()
        return time.perf_counter() - start

    rng = np.random.default_rng(0)
    completions = [format_answer(record.gt_slice, [[v + rng.uniform(-3, 3) for v in box] for box in record.gt_boxes], think="t",
                                 answer_format=answer_format, image_size=record.image_size)
                   for _ in range(group)]
    target = record.reward_target(answer_format=answer_format).to_json()

    def group_reward():
        reward = reward_functions(rewards, store, make_propagator())[0][-1]  # coherence, or the release's consistency
        sync()
        start = time.perf_counter()
        scores = reward(prompts=[None] * group, completions=completions, reward_target=[target] * group)
        sync()
        return time.perf_counter() - start, scores, reward.scorer.prepare_calls

    warm = one_propagation()
    ones, groups = [], []
    for _ in range(max(1, repeats)):  # interleaved, so a change of load hits both sides
        ones.append(one_propagation())
        grouped, scores, prepare_calls = group_reward()
        groups.append(grouped)
    one, grouped = min(ones), min(groups)
    return {"warmup_run_s": round(warm, 3), "one_propagation_s": round(one, 3), f"group_of_{group}_s": round(grouped, 3),
            "group_over_one": round(grouped / one, 3), "repeats": len(ones),
            "all_one_s": [round(t, 2) for t in ones], f"all_group_of_{group}_s": [round(t, 2) for t in groups],
            "prepare_calls": prepare_calls, "slices_propagated": z[1] - z[0] + 1, "window": window,
            "scores": [round(s, 3) for s in scores]}


def plausible_answer(target_json, rng) -> str:
    """A parseable answer near the ground truth: one of the 3 shown slices with the largest target area, GT boxes
    jittered by up to 3 px. Stands in for a trained policy's answer so the rewards run at their real load."""
    from MedVolR1Lib.anchor import AnswerFormat, format_answer
    from MedVolR1Lib.rewards import RewardTarget

    target = RewardTarget.coerce(target_json)
    candidates = sorted((k for k, boxes in target.gt_boxes.items() if boxes), key=lambda k: -target.slice_areas[k])[:3]
    if not candidates:
        return "<think>t</think><answer>{}</answer>"
    k = candidates[int(rng.integers(len(candidates)))]
    boxes = [[v + rng.uniform(-3, 3) for v in box] for box in target.gt_boxes[k]]
    fmt = AnswerFormat.from_spec(target.answer_format)  # the policy's schema and coordinates, as the rewards parse them
    return format_answer(k, boxes, think="t", answer_format=fmt, image_size=target.image_size)


def substitute_answers(trainer, seed: int = 0) -> None:
    """Random weights never write a parseable answer, so the coherence reward would never propagate and the
    rewards phase would cost nothing. For the TIMING only, score near-GT answers (plausible_answer) in place of
    the garbage completions (same conversational structure); generation, loss and backward still use the
    policy's own tokens. Turned off by --real-completions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    original = trainer._calculate_rewards

    def substituted(inputs, prompts, completions, completion_ids_list):
        texts = [plausible_answer(row["reward_target"], rng) for row in inputs]
        new = [[{"role": "assistant", "content": t}] if isinstance(c, list) else t for c, t in zip(completions, texts)]
        return original(inputs, prompts, new, completion_ids_list)

    trainer._calculate_rewards = substituted


def summarise_steps(timer: PhaseTimer) -> dict:
    """Per-step seconds: step 1 (warm-up) apart from the mean of steps 2..N; 'propagation' is part of 'rewards'."""
    keys = {"step_total": "step_total", "generation": "generation", "rewards": "rewards",
            "propagation": "propagation_per_rewards", "loss_forward": "loss_forward", "backward": "backward"}
    out: dict = {"first_step_s": {}, "later_steps_mean_s": {}}
    for name, key in keys.items():
        calls = timer.calls.get(key, [])  # one call per step (gradient_accumulation_steps 1, one generation per step)
        out["first_step_s"][name] = round(calls[0], 3) if calls else None
        later = calls[1:]
        out["later_steps_mean_s"][name] = round(statistics.mean(later), 3) if later else None
    out["calls_per_phase"] = {k: len(v) for k, v in sorted(timer.calls.items())}
    for part in ("first_step_s", "later_steps_mean_s"):
        d = out[part]
        if d.get("step_total"):
            known = sum(d.get(k) or 0.0 for k in ("generation", "rewards", "loss_forward", "backward"))
            d["other"] = round(d["step_total"] - known, 3)  # logps of the old policy, advantages, optimizer step, logging
            d["rewards_without_propagation"] = round((d.get("rewards") or 0.0) - (d.get("propagation") or 0.0), 3)
    later = out["later_steps_mean_s"]
    if later.get("step_total"):
        out["later_share_of_step"] = {k: round((v or 0.0) / later["step_total"], 3) for k, v in later.items() if k != "step_total"}
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny Qwen fixture, micro SAM2, small views")
    parser.add_argument("--family", default="qwen2.5-vl", choices=sorted(FAMILY_RECIPES),
                        help="qwen3-vl: the release's recipe (defaults in FAMILY_RECIPES)")
    parser.add_argument("--recipe", default=None,
                        help="training config whose grpo section sets lr, LoRA, G, beta, loss and rewards "
                             "(default for qwen3-vl: Training/configs/ctorg-release.yaml; none for qwen2.5-vl)")
    parser.add_argument("--sample-dir", default=None, help="a copy of the sample cache (folder holding sample_ct/); default: the user cache")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default 3; 2 with --tiny); step 1 is the warm-up")
    parser.add_argument("--views", type=int, default=None, help="default 16 (4 with --tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="default 448 (112 with --tiny)")
    parser.add_argument("--generations", type=int, default=None, help="rollouts per prompt (= per-device batch); default 8")
    parser.add_argument("--max-completion-length", type=int, default=None, help="default 128 (32 with --tiny)")
    parser.add_argument("--window", type=int, default=None, help="coherence +-W slices (default 8; 2 with --tiny)")
    parser.add_argument("--sam-size", type=int, default=None, help="SAM2 image size (512; micro 128 with --tiny)")
    parser.add_argument("--lora-rank", type=int, default=None, help="default 64 (the 3B config; 8 with --tiny)")
    parser.add_argument("--beta", type=float, default=None, help="KL weight (>0 adds the reference forward); default 0")
    parser.add_argument("--coherence-repeats", type=int, default=3,
                        help="timed repeats of the group-vs-one coherence comparison (0: skip it)")
    parser.add_argument("--real-completions", action="store_true",
                        help="score the policy's own completions (random weights: never parseable, so no propagation)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager | flash_attention_2)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    tiny = args.tiny
    recipe = dict(FAMILY_RECIPES[args.family])
    recipe_file = args.recipe or recipe.get("recipe")
    from_recipe = read_recipe(recipe_file) if recipe_file else {}
    for ours, theirs in (("learning_rate", "learning_rate"), ("lora_rank", "lora_rank"), ("generations", "num_generations"),
                         ("beta", "beta"), ("loss_type", "loss_type"), ("window", "coherence_window")):
        if theirs in from_recipe:
            recipe[ours] = from_recipe[theirs]
    steps = args.steps or (2 if tiny else 3)
    views = args.views or (4 if tiny else recipe["views"])
    image_size = args.image_size or (recipe["tiny_image_size"] if tiny else recipe["image_size"])
    max_len = args.max_completion_length or (32 if tiny else recipe["max_completion_length"])
    window = args.window if args.window is not None else (2 if tiny else recipe["window"])
    sam_size = args.sam_size or (128 if tiny else 512)
    lora_rank = args.lora_rank or (8 if tiny else recipe["lora_rank"])
    lora_alpha = None if args.lora_rank or tiny else from_recipe.get("lora_alpha")
    args.generations = args.generations or recipe["generations"]
    args.beta = recipe["beta"] if args.beta is None else args.beta
    answer_format = recipe["answer_format"]
    if steps < 1:
        parser.error("--steps must be >= 1")

    import torch

    if not tiny and not torch.cuda.is_available():
        print("gpu_bench_grpo: CUDA is not available (torch {}, CUDA build {}). Run it on a GPU machine, "
              "or pass --tiny for a CPU smoke check.".format(torch.__version__, torch.version.cuda), file=sys.stderr)
        return 2
    cache = resolve_sample_cache(args.sample_dir)
    if cache:
        os.environ["MEDVOLR1_CACHE"] = cache
    warnings.filterwarnings("ignore", message=".*cannot import name '_C'.*")
    if tiny:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cuda = not tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    import transformers
    import trl
    from trl import GRPOConfig, GRPOTrainer

    from MedVolR1Lib.propagation.factory import build_propagator
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.training.config import RewardArguments
    from MedVolR1Lib.training.data import grpo_dataset
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset
    from MedVolR1Lib.training.records import read_records
    from MedVolR1Lib.training.run import reward_functions
    from MedVolR1Lib.training.store import VolumeStore

    sample = fetch_sample(offline=True)  # DataError naming the folder when the cache copy is missing
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_bench_grpo_"))
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (--tiny smoke check)",
        "weights": "random (policy and SAM2): timings and memory only, no accuracy",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__, "trl": trl.__version__},
        "sample_ct": str(sample.ct_path),
        "settings": {"steps": steps, "views": views, "image_size": image_size, "generations": args.generations,
                     "max_completion_length": max_len, "coherence_window": window, "sam_image_size": sam_size,
                     "lora_rank": lora_rank, "beta": args.beta, "dtype": str(dtype).replace("torch.", ""), "attn": args.attn,
                     "family": args.family, "answer_format": answer_format.spec, "loss_type": recipe["loss_type"],
                     "learning_rate": recipe["learning_rate"], "gradient_checkpointing": True, "recipe": recipe_file,
                     "lora_target_regex": from_recipe.get("lora_target_regex", "language model only (PolicyArguments default)")},
    }

    t0 = time.perf_counter()
    prepare_dataset(PrepareArguments(out_dir=str(out / "data"), targets=TARGETS, num_views=views, image_size=image_size,
                                     max_queries_per_target=2))
    result["prepare_data_s"] = round(time.perf_counter() - t0, 2)
    data = out / "data"

    t0 = time.perf_counter()
    ckpt, overrides = build_sam_checkpoint(out, tiny, sam_size)
    result["build_sam_checkpoint_s"] = round(time.perf_counter() - t0, 2)
    prop_device = "cuda" if cuda else "cpu"

    def make_propagator():
        return build_propagator("medsam2", sam_checkpoint=ckpt, device=prop_device, sam_overrides=overrides)

    reward_settings = {k: from_recipe[k] for k in ("reward_mode", "release_variant", "reward_format", "reward_slice",
                                                   "reward_grounding", "reward_coherence") if k in from_recipe}
    reward_settings.setdefault("reward_coherence", 1.0)
    rewards = RewardArguments(**reward_settings, coherence_propagator="medsam2", sam_checkpoint=ckpt, coherence_window=window)
    result["settings"]["rewards"] = {k: getattr(rewards, k) for k in ("reward_mode", "release_variant", "reward_format", "reward_slice",
                                                                       "reward_grounding", "reward_coherence", "coherence_window")}

    # 1) the coherence reward's group cost, before the policy takes GPU memory
    if args.coherence_repeats > 0:
        result["coherence"] = coherence_group_cost(data, make_propagator, sync, window, args.generations, repeats=args.coherence_repeats,
                                                   rewards=rewards, answer_format=answer_format)
        if cuda:
            torch.cuda.empty_cache()
            result["cuda_peak_gib_coherence_bench"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"coherence: one propagation {result['coherence']['one_propagation_s']:.3f} s, group of {args.generations} "
              f"{result['coherence'][f'group_of_{args.generations}_s']:.3f} s -> {result['coherence']['group_over_one']:.2f}x "
              f"({result['coherence']['prepare_calls']} prepare)", flush=True)

    # 2) GRPO steps
    propagator = make_propagator()
    timer = PhaseTimer(cuda)
    timer.wrap(propagator, "propagate", "propagation")
    timer.wrap(propagator, "prepare", "propagation")
    store = VolumeStore.from_dir(data)
    funcs, weights = reward_functions(rewards, store, propagator)
    result["reward_functions"] = dict(zip([f.__name__ for f in funcs], weights))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, processor = build_policy(tiny, device, dtype, args.attn, lora_rank, args.family, lora_alpha=lora_alpha,
                                    lora_target_regex=from_recipe.get("lora_target_regex"))
    sync()
    result["build_policy_s"] = round(time.perf_counter() - t0, 2)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["parameters_b"] = round(total / 1e9, 4)
    result["trainable_parameters_m"] = round(trainable / 1e6, 3)
    if cuda:
        result["cuda_weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    print(f"policy: {total / 1e9:.3f} B parameters ({trainable / 1e6:.2f} M trainable, LoRA r={lora_rank}), {dtype}, {device}", flush=True)

    config = GRPOConfig(
        output_dir=str(out / "grpo"), use_cpu=not cuda, bf16=cuda, max_steps=steps,
        per_device_train_batch_size=args.generations, num_generations=args.generations, max_completion_length=max_len,
        temperature=1.0, learning_rate=recipe["learning_rate"], beta=args.beta, loss_type=recipe["loss_type"], epsilon=0.2,
        epsilon_high=0.28 if recipe["loss_type"] == "dapo" else None,
        reward_weights=weights, gradient_checkpointing=True, generation_kwargs={"use_cache": True},
        report_to="none", save_strategy="no", logging_steps=1, seed=0, remove_unused_columns=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=config,
                          train_dataset=grpo_dataset(read_records(data / "train.jsonl"), store, answer_format=answer_format),
                          processing_class=processor)
    if not args.real_completions:
        substitute_answers(trainer)
    result["rewards_scored_on"] = ("the policy's own completions" if args.real_completions else
                                   "near-GT answers substituted for the random policy's completions (timing only)")
    timer.wrap(trainer, "_generate", "generation", track_peak=True)
    timer.wrap(trainer, "_calculate_rewards", "rewards", track_peak=True, nested="propagation")
    timer.wrap(trainer, "compute_loss", "loss_forward", track_peak=True)
    timer.wrap(trainer.accelerator, "backward", "backward", track_peak=True)
    timer.wrap(trainer, "training_step", "step_total")
    trainer.train()

    result["grpo"] = summarise_steps(timer)
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    if logs:
        result["grpo"]["completion_mean_length"] = [round(e["completions/mean_length"], 1) for e in logs]
        tokens = [e.get("num_tokens") for e in logs]
        if all(t is not None for t in tokens):
            per_step = [tokens[0]] + [b - a for a, b in zip(tokens, tokens[1:])]
            result["grpo"]["prompt_tokens_per_rollout"] = round(per_step[-1] / args.generations - logs[-1]["completions/mean_length"], 1)
        result["grpo"]["reward_mean"] = [round(e.get("reward", float("nan")), 4) for e in logs]
        generation = timer.calls.get("generation", [])
        rates = [args.generations * e["completions/mean_length"] / t for e, t in zip(logs, generation) if t > 0]
        if rates:  # completion tokens per second of the generation phase (later steps; step 1 if only one)
            later_rates = rates[1:] or rates
            result["grpo"]["generation_tokens_per_s"] = round(statistics.mean(later_rates), 1)
    result["grpo"]["propagator"] = propagator.describe() if hasattr(propagator, "describe") else {}
    if cuda:
        result["cuda_peak_gib_by_phase"] = {k: round(v, 2) for k, v in timer.peak_gib.items()}
        result["cuda_peak_gib_max_phase"] = round(max(timer.peak_gib.values(), default=0.0), 2)
        result["cuda_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    result["cpu_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    print(json.dumps(result, indent=1, default=str))
    later = result["grpo"]["later_steps_mean_s"] if steps > 1 else result["grpo"]["first_step_s"]
    label = "mean of steps 2.." if steps > 1 else "step 1 (warm-up)"
    print(f"GRPO step ({label}): {later.get('step_total')} s = generation {later.get('generation')} + rewards {later.get('rewards')} "
          f"(propagation {later.get('propagation')}) + loss fwd {later.get('loss_forward')} + backward {later.get('backward')} "
          f"+ other {later.get('other')}")
    if cuda:
        print(f"peak CUDA memory by phase (GiB): {result['cuda_peak_gib_by_phase']}")
    print(f"SUMMARY grpo: {result['grpo'].get('generation_tokens_per_s')} generated tokens/s, step {later.get('step_total')} s, "
          f"peak {result.get('cuda_peak_gib_max_phase', 'n/a (CPU)')} GiB, rewards {result['reward_functions']}")
    if "coherence" in result:
        print(f"coherence reward, group of {args.generations} / one propagation: {result['coherence']['group_over_one']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
