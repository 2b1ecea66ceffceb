"""Headless training: prepare -> SFT -> GRPO -> evaluate on the tiny offline Qwen2.5-VL and the real sample CT.

Random-weight models check wiring only.  The learning-path test gives GRPO rewards that differ within a
group (a text reward defined here, since the MedVolR1 rewards all tie at 0 for a random policy) and checks
that one step moves the LoRA weights toward the higher-reward completion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "Training" / "configs" / "cpu-smoke.yaml"

torch.set_num_threads(1)  # the tiny model is ~30x faster single-threaded on a shared 2-core machine


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"training_script_{name}", REPO / "Training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_chain(root: Path, model_dir: Path, *, sft_args=(), grpo_args=(), eval_args=(), checkpoints=None, data=None) -> dict:
    """prepare -> SFT -> GRPO -> evaluate exactly as the README runs them, paths moved under `root`."""
    sft, grpo, report = root / "sft", root / "grpo", root / "eval"
    model = ["--model_name_or_path", str(model_dir)]
    summary = None
    if data is None:
        data = root / "data"
        summary = _script("prepare_data").main(["--config", str(SMOKE), "--out_dir", str(data)])
    _script("sft").main(["--config", str(SMOKE), "--data_dir", str(data), "--output_dir", str(sft), *model, *sft_args])
    _script("grpo").main(["--config", str(SMOKE), "--data_dir", str(data), "--output_dir", str(grpo), "--adapter_path", str(sft), *model, *grpo_args])
    result = _script("evaluate").main([
        "--config", str(SMOKE), "--eval_data_dir", str(data), "--report_dir", str(report),
        "--checkpoints", checkpoints or f"base={model_dir},sft={sft},grpo={grpo}", *eval_args,
    ])
    return {"data": data, "sft": sft, "grpo": grpo, "report": report, "prepare": summary, "eval": result, "model": model_dir}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_qwen_dir):
    """The CI smoke chain with the tiny Qwen2.5-VL (pixel coordinates, our schema)."""
    return _run_chain(tmp_path_factory.mktemp("smoke"), tiny_qwen_dir)


@pytest.fixture(scope="module")
def chain_qwen3(tmp_path_factory, tiny_qwen3_dir, chain):
    """The same chain with the tiny Qwen3-VL in the paper's schema (0-1000 from the family), shortened:
    it reuses the prepared data and evaluates only the GRPO checkpoint on one record."""
    paper = ["--answer_schema", "paper"]
    root = tmp_path_factory.mktemp("smoke_qwen3")
    return _run_chain(
        root, tiny_qwen3_dir, data=chain["data"], sft_args=[*paper, "--max_steps", "3"], grpo_args=[*paper, "--max_steps", "1"],
        eval_args=["--max_records", "1", "--blank_control", "false"], checkpoints=f"grpo={root / 'grpo'}",
    )


def test_qwen3_chain_trains_in_the_paper_schema_and_records_the_convention(chain_qwen3):
    from MedVolR1Lib.training.checkpoints import read_manifest
    from MedVolR1Lib.training.data import sft_dataset
    from MedVolR1Lib.training.records import read_records
    from MedVolR1Lib.training.store import VolumeStore
    from MedVolR1Lib.anchor import AnswerFormat, parse_model_answer

    for stage in ("sft", "grpo"):
        manifest = read_manifest(chain_qwen3[stage])
        assert (manifest["family"], manifest["coordinates"], manifest["answer_schema"]) == ("qwen3-vl", "norm1000", "paper")
    state = json.loads((chain_qwen3["grpo"] / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and any("rewards/format_reward/mean" in e for e in state["log_history"])
    # SFT targets are written in the configured schema and coordinates, and parse back to the GT pixel boxes
    records = read_records(chain_qwen3["data"] / "train.jsonl")[:2]
    fmt = AnswerFormat("paper", "norm1000")
    row = sft_dataset(records, VolumeStore.from_dir(chain_qwen3["data"]), think="template", answer_format=fmt)[0]
    target = row["completion"][0]["content"][0]["text"]
    assert '"bbox_2d_list"' in target and "0-1000" in row["prompt"][-1]["content"][-1]["text"]
    parsed = parse_model_answer(target, fmt, records[0].image_size)
    assert parsed.slice_index == records[0].gt_slice
    unit = records[0].image_size / 1000  # one 0-1000 step in pixels: the rounding of the written target
    assert np.allclose(parsed.boxes, records[0].gt_boxes, atol=unit)
    overall = {e["method"]: e for e in chain_qwen3["eval"]["table"] if e["dataset"] == "all"}
    assert {"oracle", "grpo"} <= set(overall)


def test_grpo_refuses_an_sft_adapter_trained_in_another_convention(chain, tmp_path):
    from MedVolR1Lib.errors import CheckpointError

    with pytest.raises(CheckpointError, match="trained with pixels box coordinates"):
        _script("grpo").main([
            "--config", str(SMOKE), "--data_dir", str(chain["data"]), "--output_dir", str(tmp_path / "g"),
            "--adapter_path", str(chain["sft"]), "--model_name_or_path", str(chain["model"]), "--coordinates", "norm1000",
        ])
    assert not (tmp_path / "g").exists()


def test_prepare_writes_records_with_gt(chain):
    from MedVolR1Lib.training.records import read_records

    train = read_records(chain["data"] / "train.jsonl")
    test = read_records(chain["data"] / "test.jsonl")
    assert train and test
    assert {r.query_split for r in train} == {"train"} and {r.query_split for r in test} == {"held_out"}
    assert not {r.query for r in train} & {r.query for r in test}  # held-out phrasings never trained on
    for r in train[:10]:
        assert r.gt_slice in r.slices and r.areas[r.gt_slice] == max(r.areas[k] for k in r.slices)
        assert r.gt_boxes == r.boxes_by_slice[str(r.gt_slice)] and r.gt_boxes
    assert {r.target for r in train} >= {"liver", "kidneys"}
    kidneys = next(r for r in train if r.target == "kidneys")
    assert len(kidneys.gt_boxes) == 2  # one box per side
    assert len({tuple(r.slices) for r in train}) > 1  # shifted slice sets: the key slice moves


def test_sft_and_grpo_save_adapters_manifest_and_reward_logs(chain):
    from MedVolR1Lib.training.checkpoints import latest_checkpoint, read_manifest, trained_step

    for stage in ("sft", "grpo"):
        folder = chain[stage]
        assert (folder / "adapter_model.safetensors").exists()
        manifest = read_manifest(folder)
        assert manifest["stage"] == stage and manifest["base_model"] == str(chain["model"])
        assert (manifest["family"], manifest["coordinates"], manifest["answer_schema"]) == ("qwen2.5-vl", "pixels", "medvolr1")
    assert trained_step(latest_checkpoint(chain["sft"])) == 6
    assert trained_step(latest_checkpoint(chain["grpo"])) == 2
    state = json.loads((Path(latest_checkpoint(chain["grpo"])) / "trainer_state.json").read_text())
    logged = set().union(*(entry.keys() for entry in state["log_history"]))
    for name in ("format_reward", "slice_reward", "grounding_reward"):
        assert f"rewards/{name}/mean" in logged
    sft_state = json.loads((Path(latest_checkpoint(chain["sft"])) / "trainer_state.json").read_text())
    losses = [e["loss"] for e in sft_state["log_history"] if "loss" in e]
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_evaluate_report_has_oracle_controls_and_checkpoints(chain):
    report = chain["report"]
    for name in ("report.md", "results.csv", "per_record.csv", "metrics.png", "summary.json"):
        assert (report / name).stat().st_size > 0
    assert (report / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overall = {e["method"]: e for e in chain["eval"]["table"] if e["dataset"] == "all"}
    assert set(overall) == {"oracle", "blind_prior", "base", "base+blank", "sft", "sft+blank", "grpo", "grpo+blank"}
    assert overall["oracle"]["format_valid"] == 1.0 and overall["oracle"]["box_iou"] == pytest.approx(1.0)
    assert overall["oracle"]["dice"] > 0.5  # LiteMedSAM from the GT box on the key slice, scored on k +- 1
    text = (report / "report.md").read_text()
    assert "| oracle |" in text and "| blind_prior |" in text and "nsd" in text


def test_grpo_checkpoint_loads_into_the_pipeline_grounder(chain, sample_volume):
    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig

    pipeline = Pipeline(PipelineConfig(model=str(chain["model"]), adapter=str(chain["grpo"]), device="cpu", num_views=4, image_size=112))
    from MedVolR1Lib.grounder import GenerationSettings

    result = pipeline.grounder.ground(
        sample_volume, "Segment the liver.", num_views=4, image_size=112,
        settings=GenerationSettings(max_new_tokens=24, retries=0), raise_on_failure=False,
    )
    assert isinstance(result.raw_text, str) and len(result.slices) == 4  # parse success not required of a tiny model
    assert pipeline.grounder.describe()  # adapter provenance reachable


def _records_and_store(tmp_path):
    from MedVolR1Lib.training.prepare import PrepareConfig, build_records
    from MedVolR1Lib.training.records import write_records
    from MedVolR1Lib.training.store import CaseSource, VolumeStore, load_case, write_cases

    source = CaseSource("sample_ct", "sample_ct", dataset="sample")
    report = build_records(load_case(source), PrepareConfig(targets=("liver", "kidneys"), num_views=4, image_size=112, max_queries_per_target=1))
    write_cases(tmp_path / "cases.json", [source])
    write_records(tmp_path / "train.jsonl", report.records)
    return report.records, VolumeStore.from_dir(tmp_path)


def _completion_logprob(model, processor, prompt, images, completion_ids) -> float:
    from trl.data_utils import prepare_multimodal_messages

    messages = prepare_multimodal_messages(prompt, images=images)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    completion = torch.tensor([completion_ids])
    input_ids = torch.cat([inputs["input_ids"], completion], dim=1)
    attention = torch.ones_like(input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
    logps = torch.log_softmax(logits[0, inputs["input_ids"].shape[1] - 1 : -1].float(), dim=-1)
    return float(logps.gather(1, completion[0][:, None]).sum())


def test_one_grpo_step_moves_lora_toward_the_higher_reward_completion(tmp_path, tiny_qwen_dir):
    from trl import GRPOConfig, GRPOTrainer

    from MedVolR1Lib.training.config import PolicyArguments
    from MedVolR1Lib.training.data import grpo_dataset
    from MedVolR1Lib.training.policy import load_policy

    records, store = _records_and_store(tmp_path)
    dataset = grpo_dataset(records[:1], store)
    seen: list[dict] = []

    def distinct_characters(prompts, completions, completion_ids, **kwargs):
        """A reward that differs across a group of random completions (MedVolR1 rewards all tie at 0 here)."""
        rewards = [len(set(c[0]["content"] if isinstance(c, list) else c)) / 10.0 for c in completions]
        seen.append({"prompts": prompts, "ids": [list(map(int, ids)) for ids in completion_ids], "rewards": rewards, "images": kwargs.get("images")})
        return rewards

    model, processor, _ = load_policy(PolicyArguments(model_name_or_path=str(tiny_qwen_dir), lora_rank=8, lora_alpha=16, lora_dropout=0.0), use_cpu=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=12, learning_rate=2e-3, beta=0.0, loss_type="dapo", epsilon_high=0.28, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, temperature=1.0, remove_unused_columns=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[distinct_characters], args=config, train_dataset=dataset, processing_class=processor)
    row = dataset[0]
    # log-probabilities under the policy before the step need the completions: run the step, then rebuild "before"
    trainer.train()
    group = seen[0]
    assert len(set(group["rewards"])) > 1, "rewards must differ across the group for GRPO to learn"
    # the rendered views travel with every completion of the group (the policy-side check: test_grpo_signal.py)
    assert group["images"] is not None and len(group["images"]) == 4
    for views in group["images"]:
        assert len(views) == 4 and all(np.asarray(v).max() > 0 for v in views)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, row["images"]))
    best, worst = int(np.argmax(group["rewards"])), int(np.argmin(group["rewards"]))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in n for n in changed)
    after_best = _completion_logprob(model, processor, row["prompt"], row["images"], group["ids"][best])
    after_worst = _completion_logprob(model, processor, row["prompt"], row["images"], group["ids"][worst])
    with torch.no_grad():
        current = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])
    before_best = _completion_logprob(model, processor, row["prompt"], row["images"], group["ids"][best])
    before_worst = _completion_logprob(model, processor, row["prompt"], row["images"], group["ids"][worst])
    assert after_best > before_best
    assert after_best - before_best > after_worst - before_worst


def test_resumed_grpo_continues_from_the_saved_step_with_the_same_optimizer_state(tmp_path, tiny_qwen_dir):
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from MedVolR1Lib.training.config import PolicyArguments, RewardArguments, VRSDataArguments
    from MedVolR1Lib.training.run import run_grpo

    _records_and_store(tmp_path)

    class FirstStep(TrainerCallback):
        def __init__(self):
            self.step = None
            self.optimizer_state = None

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if self.step is None:
                self.step = state.global_step
                self.optimizer_state = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)} for k, v in optimizer.state_dict()["state"].items()}

    def config(out: Path) -> GRPOConfig:
        return GRPOConfig(
            output_dir=str(out), use_cpu=True, bf16=False, max_steps=2, save_steps=1, per_device_train_batch_size=4,
            num_generations=4, max_completion_length=12, learning_rate=1e-3, beta=0.0, loss_type="dapo", epsilon_high=0.28,
            report_to="none", logging_steps=1, seed=0,
        )

    data = VRSDataArguments(data_dir=str(tmp_path))
    policy = PolicyArguments(model_name_or_path=str(tiny_qwen_dir), lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    rewards = RewardArguments()
    first = tmp_path / "first"
    run_grpo(data, policy, rewards, config(first))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-1", resumed / "checkpoint-1")
    probe = FirstStep()
    run_grpo(data, policy, rewards, config(resumed), callbacks=[probe])
    assert probe.step == 1  # continued at the saved step, not from 0
    saved = torch.load(first / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"]
    assert probe.optimizer_state and set(probe.optimizer_state) == set(saved)
    for key, tensors in probe.optimizer_state.items():
        for name, value in tensors.items():
            assert torch.equal(value, saved[key][name])
    state = json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_empty_mask_and_corrupt_case_are_skipped_and_reported(tmp_path):
    from scipy import sparse

    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset
    from MedVolR1Lib.training.records import read_records

    root = tmp_path / "M3D_Seg"
    X, Y, Z = 40, 40, 24  # square in-plane matrix: the reader finds the axial axis
    entries = []
    for case in ("c1", "c2"):
        folder = root / "0003" / case
        folder.mkdir(parents=True)
        image = np.random.default_rng(0).normal(0, 0.2, (X, Y, Z)).astype(np.float32)
        onehot = np.zeros((4, X, Y, Z), dtype=bool)
        onehot[0, 5:25, 5:25, 4:20] = True  # liver present; kidney, spleen, pancreas empty
        image[onehot[0]] = 2.0
        np.save(folder / "image.npy", image[None])
        sparse.save_npz(folder / f"mask_(4, {X}, {Y}, {Z}).npz", sparse.csr_matrix(onehot.reshape(4, -1).astype(np.float32)))
        entries.append({"image": f"0003/{case}/image.npy", "label": f"0003/{case}/mask_(4, {X}, {Y}, {Z}).npz"})
    (root / "0003" / "c2" / "image.npy").write_bytes(b"garbage")
    (root / "0003" / "0003.json").write_text(json.dumps({"train": entries[:1], "test": entries[1:]}))
    summary = prepare_dataset(PrepareArguments(
        out_dir=str(tmp_path / "data"), sample_ct=False, m3d_root=str(root), m3d_datasets="0003",
        targets="liver,spleen,kidneys,kidney_left", num_views=4, image_size=56,
    ))
    train = read_records(tmp_path / "data" / "train.jsonl")
    assert train and {r.target for r in train} == {"liver"} and {r.dataset for r in train} == {"0003"}
    reasons = {(s["case"], s["target"]): s["reason"] for s in summary["skipped"]}
    assert "absent" in reasons[("0003/c1", "spleen")] and "absent" in reasons[("0003/c1", "kidneys")]
    assert "laterality" in reasons[("0003/c1", "kidney_left")]  # M3D orientation unverified: no left/right targets
    assert "0003/c2" in reasons[("0003/c2", "*")] and "unreadable" in reasons[("0003/c2", "*")]
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["skipped"] == summary["skipped"]
    axes = report["cases"]["0003/c1"]  # the reader's axial-axis decision is recorded per case, with its reason
    assert axes["axial_axis"] == 2 and axes["method"] == "square in-plane matrix" and "40x40" in axes["reason"]


def test_coherence_reward_shares_one_prepared_propagator_across_a_group(tmp_path):
    from MedVolR1Lib.propagation.factory import build_propagator
    from MedVolR1Lib.training.config import RewardArguments
    from MedVolR1Lib.training.run import reward_functions

    records, store = _records_and_store(tmp_path)
    record = next(r for r in records if r.target == "kidneys")
    propagator = build_propagator("litemedsam", device="cpu")
    funcs, weights = reward_functions(RewardArguments(reward_coherence=1.0, coherence_window=1), store, propagator)
    assert [f.__name__ for f in funcs][-1] == "coherence_reward" and len(weights) == 4
    target = record.reward_target().to_json()
    completions = [record.answer_text("t")] * 2 + ["garbage", "<answer>{\"slice\": 0}</answer>"]
    scores = funcs[-1](prompts=[None] * 4, completions=completions, reward_target=[target] * 4)
    assert scores[0] == scores[1] > 0.5 and scores[2] == scores[3] == 0.0
    assert funcs[-1].scorer.prepare_calls == 1


def test_merge_adapter_writes_base_plus_adapter_and_refuses_to_overwrite(tmp_path, tiny_qwen_dir, tiny_lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from MedVolR1Lib.errors import CheckpointError
    from MedVolR1Lib.training.checkpoints import read_manifest

    out = tmp_path / "merged"
    merge = _script("merge_adapter").main
    assert merge(["--adapter", str(tiny_lora_dir), "--out_dir", str(out), "--base_model", str(tiny_qwen_dir), "--dtype", "float32"]) == str(out)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    plain = base(input_ids=ids).logits
    wrapped = PeftModel.from_pretrained(base, str(tiny_lora_dir))
    with torch.no_grad():
        expected, got = wrapped(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4) and not torch.allclose(got, plain, atol=1e-4)
    assert read_manifest(out)["stage"] == "merged" and read_manifest(out)["merged_adapter"] == str(tiny_lora_dir)
    with pytest.raises(CheckpointError, match="exists"):
        merge(["--adapter", str(tiny_lora_dir), "--out_dir", str(out), "--base_model", str(tiny_qwen_dir)])
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        merge(["--adapter", str(tmp_path), "--out_dir", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def _recipe_grpo(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "Training" / "configs" / f"{name}-release.yaml").read_text())["grpo"]


@pytest.mark.parametrize("recipe", ["ctorg", "kits23"])
def test_smoke_chain_runs_with_each_release_recipe(recipe, chain_qwen3, tmp_path):
    """The recipe's path on the tiny Qwen3-VL: SFT adapter -> merged model -> one GRPO step with the recipe's reward
    mode, variant and weights (a new LoRA with the vision tower for CT-ORG, every weight for KiTS23) -> evaluation.
    CT-ORG's consistency term runs through LiteMedSAM here (real weights; MedSAM2 weights are not offline)."""
    from MedVolR1Lib.training.checkpoints import read_manifest

    grpo_cfg = _recipe_grpo(recipe)
    merged = tmp_path / "sft-merged"
    _script("merge_adapter").main(["--adapter", str(chain_qwen3["sft"]), "--out_dir", str(merged)])
    keys = ("reward_mode", "release_variant", "reward_format", "reward_slice", "reward_grounding", "reward_coherence")
    flags = [part for key in keys for part in (f"--{key}", str(grpo_cfg[key]))]
    if grpo_cfg["reward_coherence"]:
        flags += ["--coherence_propagator", "litemedsam", "--coherence_window", "1"]
    if grpo_cfg.get("use_lora", True):
        flags += ["--use_lora", "true", "--lora_rank", "4", "--lora_alpha", "8", "--lora_target_regex", grpo_cfg["lora_target_regex"]]
    else:
        flags += ["--use_lora", "false", "--freeze_vision", str(grpo_cfg["freeze_vision"]).lower()]
    out = tmp_path / "grpo"
    _script("grpo").main([
        "--config", str(SMOKE), "--data_dir", str(chain_qwen3["data"]), "--output_dir", str(out), "--adapter_path", "",
        "--model_name_or_path", str(merged), "--answer_schema", "paper", "--max_steps", "1", "--save_steps", "1", *flags,
    ])
    manifest = read_manifest(out)
    expected = ["release_format_reward", "release_time_reward", "release_space_reward"]
    if grpo_cfg["reward_coherence"]:
        expected.append("release_consistency_reward")
    assert manifest["reward_functions"] == expected and manifest["base_model"] == str(merged)
    weights = [grpo_cfg[k] for k in keys[2:]][: len(expected)]
    assert manifest["reward_weights"] == pytest.approx(weights)
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert all(any(f"rewards/{name}/mean" in entry for entry in state["log_history"]) for name in expected)
    if grpo_cfg.get("use_lora", True):
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and "visual" in str(adapter["target_modules"])
    else:
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    result = _script("evaluate").main([
        "--config", str(SMOKE), "--eval_data_dir", str(chain_qwen3["data"]), "--report_dir", str(tmp_path / "eval"),
        "--checkpoints", f"grpo={out}", "--max_records", "1", "--blank_control", "false",
    ])
    assert (tmp_path / "eval" / "results.csv").exists() and result


def test_a_non_saving_rank_writes_no_processor_or_manifest(chain, tmp_path, monkeypatch):
    """On a rank other than the main one (simulated: transformers' should_save is False there) nothing is
    written to the output folder; the main process's writes are what the chain tests check."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "should_save", property(lambda self: False))
    out = tmp_path / "sft_rank1"
    _script("sft").main(["--config", str(SMOKE), "--data_dir", str(chain["data"]), "--output_dir", str(out),
                         "--model_name_or_path", str(chain["model"]), "--max_steps", "1"])
    written = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert not [n for n in written if n.endswith((".json", ".safetensors", ".jinja", ".txt"))], written
