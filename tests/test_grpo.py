"""GRPO (issue 13) on tiny presets of every family: the prompts are evaluation's, a short run trains what the
tuning mode trains and logs finite rewards and KL, an SFT adapter continues under GRPO against itself, an
interrupted run resumes where it stopped, and a reasoning run is evaluated the way it was rewarded."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chartvlm.train as train_module
from chartvlm.config import parse_config
from chartvlm.errors import ChartVLMError
from chartvlm.interrupt import InterruptCallback, TrainingInterrupted
from chartvlm.train import main as train_main
from conftest import ALL_KINDS, TEST_MAX_PIXELS, TEST_MIN_PIXELS, chart_rows, kind_id, run_args, tiny_of

# A reward that varies across a random model's samples (so groups have advantages to learn from), the metric
# and the format: the user's-own path and both built-ins in every run.
REWARDS = json.dumps({"grpo_rewards:distinct_characters": 1.0, "relaxed_accuracy": 1.0, "format": 0.5})
STEPS = 2


def grpo_args(model_dir, data_dir, out, *extra: str) -> list[str]:
    """2 questions a step, 2 completions each, 6 new tokens."""
    return run_args(model_dir, data_dir, out, "--method", "grpo", "--max_steps", str(STEPS), "--num_generations",
                    "2", "--max_completion_length", "6", "--rewards", REWARDS, *extra)


@pytest.fixture(scope="module")
def family_model_dirs(tmp_path_factory):
    """Each kind's tiny model on disk, written once."""
    from chartvlm.modelinit import TINY_PRESETS, init_model

    root = tmp_path_factory.mktemp("grpo-models")
    return lambda family, tokenizer: init_model(TINY_PRESETS[family], root / f"{family}-{tokenizer}", seed=0,
                                                min_pixels=TEST_MIN_PIXELS, max_pixels=TEST_MAX_PIXELS,
                                                tokenizer=tokenizer) \
        if not (root / f"{family}-{tokenizer}").exists() else root / f"{family}-{tokenizer}"


@pytest.fixture
def trained(monkeypatch):
    """Runs train.main and records the trained model's parameters at the end: {name: (tensor, requires_grad)}."""
    record = {}
    save_outputs = train_module.save_outputs

    def save_and_record(trainer, processor, config, base):
        record.update({name: (param.detach().clone(), param.requires_grad)
                       for name, param in trainer.model.named_parameters()})
        return save_outputs(trainer, processor, config, base)

    monkeypatch.setattr(train_module, "save_outputs", save_and_record)
    return record


def logged(folder: Path) -> list[dict]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "reward" in entry]


def assert_finite_rewards_and_kl(folder: Path, names=("grpo_rewards:distinct_characters", "relaxed_accuracy",
                                                      "format")) -> list:
    entries = logged(folder)
    assert [entry["step"] for entry in entries] == list(range(1, STEPS + 1))
    for entry in entries:
        for key in ["reward", "reward_std", "kl", "completions/mean_length",
                    *(f"rewards/{name}/{stat}" for name in names for stat in ("mean", "std"))]:
            assert math.isfinite(entry[key]), (key, entry)
    return entries


def loaded_parameters(model_dir) -> dict:
    """The parameters of the model in `model_dir` as training loads it (in-memory names)."""
    from chartvlm.modeling import load_model

    model = load_model(str(model_dir), device=torch.device("cpu"), dtype=torch.float32)
    return {name: param.detach() for name, param in model.named_parameters()}


def base_weights(model_dir) -> dict:
    return {k: v for path in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(str(path)).items()}


# ------------------------------------------------------------------------------------------ prompts and pixels


# Reasoning's system prompt names <think> and </think>, control tokens of Qwen3's vocabularies: every Qwen3
# family is checked with it (the real vocabulary included), the others without, and one with both.
PROMPT_CASES = [(kind, kind[0].startswith("qwen3")) for kind in ALL_KINDS] + [(("qwen2_5_vl", "ours"), True)]


@pytest.mark.parametrize("kind,reasoning", PROMPT_CASES, ids=lambda case: kind_id(case) if isinstance(case, tuple)
                         else "reasoning" if case else "plain")
def test_grpo_prompts_and_pixels_are_the_ones_evaluation_gives_the_model(kind, reasoning, chart_dataset_dir,
                                                                          tmp_path):
    """TRL tokenizes the prompts itself (and processes the images again for the loss): both must equal what
    evaluation feeds the model for the same question, token for token and pixel for pixel."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    from chartvlm.generate import generation_inputs
    from chartvlm.grpo import build_grpo_trainer
    from chartvlm.prompts import check_system_message, control_tokens, format_data, prompt_messages, render

    model, processor = tiny_of(*kind)
    config = parse_config(grpo_args("unused", chart_dataset_dir, tmp_path, "--tuning", "full", "--beta", "0",
                                    "--reasoning", str(reasoning).lower()))
    system = config.data.system_message
    check_system_message(system, "system_message", control_tokens(processor.tokenizer))  # as train.main does
    rows = chart_rows(4)
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    trainer = build_grpo_trainer(copy.deepcopy(model), processor, config, dataset)
    inputs = [trainer.train_dataset[i] for i in range(len(rows))]
    prompts = [prepare_multimodal_messages(row["prompt"], images=[row["image"]]) for row in inputs]
    prompt_ids, _, fields = trainer._tokenize_prompts(prompts)

    expected = generation_inputs([format_data(row, system) for row in rows], processor)
    for i, ids in enumerate(prompt_ids):
        real = expected["attention_mask"][i].bool()
        assert list(ids) == expected["input_ids"][i][real].tolist(), f"row {i}: GRPO prompt differs from eval's"
    torch.testing.assert_close(fields["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert torch.equal(fields["image_grid_thw"], expected["image_grid_thw"])
    # The text TRL renders for the loss pass (then processed with the same images) is evaluation's prompt.
    for prompt, row in zip(prompts, rows, strict=True):
        text = apply_chat_template({"prompt": prompt}, processor, **trainer.chat_template_kwargs)["prompt"]
        assert text == render(processor, prompt_messages(format_data(row, system)), generation_prompt=True)
        assert system in text


def test_completions_end_at_im_end_when_the_checkpoint_declares_another_end_token(tiny, chart_dataset_dir, tmp_path):
    """A base checkpoint (Qwen2-VL-2B) ends text with <|endoftext|>: sampling must still stop, and completions be
    cut, at <|im_end|>, where chartvlm's answers end."""
    from datasets import Dataset

    from chartvlm.grpo import build_grpo_trainer

    model, processor = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    text_end = processor.tokenizer.pad_token_id
    processor.tokenizer.eos_token = processor.tokenizer.pad_token
    model.generation_config.eos_token_id = text_end
    config = parse_config(grpo_args("unused", chart_dataset_dir, tmp_path, "--tuning", "full", "--beta", "0"))
    trainer = build_grpo_trainer(model, processor, config, Dataset.from_list(chart_rows(2)))
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in trainer.eos_token_ids and end in trainer.generation_config.eos_token_id
    assert text_end in trainer.eos_token_ids


# ------------------------------------------------------------------------------------------ what trains


@pytest.mark.parametrize("kind", ALL_KINDS, ids=kind_id)
def test_two_grpo_steps_change_the_lora_weights_only_and_log_finite_rewards_and_kl(
        kind, family_model_dirs, chart_dataset_dir, tmp_path, trained):
    model_dir = family_model_dirs(*kind)
    # Qwen3's families reason: their vocabularies hold <think> and </think>, which the system prompt names.
    reasoning = kind[0].startswith("qwen3")
    out = train_main(parse_config(grpo_args(model_dir, chart_dataset_dir, tmp_path / "out", "--reasoning",
                                            str(reasoning).lower())))
    if reasoning:  # predict and serve ask it as trained
        from chartvlm.predict import inference_setup
        from chartvlm.prompts import REASONING_SYSTEM_MESSAGE

        conversation = inference_setup(str(model_dir), str(out)).conversation(None, "Which is larger?", "question")
        assert conversation[0]["content"][0]["text"] == REASONING_SYSTEM_MESSAGE

    lora = {name for name in trained if "lora_" in name}
    assert lora and all(trained[name][1] for name in lora)
    assert not any(grad for name, (_, grad) in trained.items() if name not in lora)
    moved = [name for name in lora if "lora_B" in name and trained[name][0].abs().sum() > 0]
    assert moved, "GRPO must move the adapter"
    # Every other weight is the base model's, untouched.
    base = loaded_parameters(model_dir)
    untouched = {name.replace("base_model.model.", "").replace(".base_layer", ""): tensor
                 for name, (tensor, _) in trained.items() if name not in lora}
    assert untouched.keys() == base.keys()
    assert all(torch.equal(tensor, base[name]) for name, tensor in untouched.items())
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in key for key in saved)
    assert not (out / "ref").exists()

    entries = assert_finite_rewards_and_kl(out)
    assert entries[0]["kl"] == 0.0 and entries[-1]["kl"] > 0, "the second step's policy has moved from the first's"
    assert (out / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved_config = (out / "chartvlm_config.yaml").read_text()
    assert "method: grpo" in saved_config and "distinct_characters" in saved_config


@pytest.mark.parametrize("mode", ["lora+vision", "full", "full+vision"])
def test_every_tuning_mode_trains_what_it_says_under_grpo(mode, tiny_model_dir, chart_dataset_dir, tmp_path, trained):
    flags = {"lora+vision": ["--train_vision_tower", "true"], "full": ["--tuning", "full"],
             "full+vision": ["--tuning", "full", "--train_vision_tower", "true"]}[mode]
    out = train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "out", *flags)))
    base = base_weights(tiny_model_dir)
    vision = {name for name in trained
              if ".visual." in f".{name}" and "lora_" not in name and "original_module" not in name}
    assert all(trained[name][1] for name in vision) == ("vision" in mode)
    saved = {k: v for path in out.glob("*.safetensors") for k, v in load_file(str(path)).items()}
    if mode == "full":
        changed = [k for k in base if k in saved and not torch.equal(base[k], saved[k])]
        assert changed and all("visual" not in k for k in changed)
    else:  # the trained tower is saved: with LoRA in the adapter (modules_to_save), in full tuning in the model
        tower = {k: v for k, v in saved.items() if "visual" in k and "lora_" not in k}
        assert tower and any(not torch.equal(v, base[key]) for key, v in base_vision_pairs(base, tower))
    assert_finite_rewards_and_kl(out)


def base_vision_pairs(base: dict, tower: dict):
    """(base key, trained tensor) for the saved vision tensors, whatever prefix the save gave them."""
    for key, value in tower.items():
        plain = key.replace("base_model.model.", "").replace("modules_to_save.default.", "").replace(
            "modules_to_save.", "")
        match = next((b for b in base if b.endswith(plain.split("visual.", 1)[1]) and "visual" in b), None)
        if match is not None:
            yield match, value


def test_a_reward_that_scores_nothing_still_leaves_the_model_and_its_curves(tiny_model_dir, chart_dataset_dir,
                                                                            tmp_path):
    rewards = json.dumps({"relaxed_accuracy": 1.0, "grpo_rewards:unscored": 0.5})
    out = train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "out", "--rewards",
                                            rewards)))
    means = [entry["rewards/grpo_rewards:unscored/mean"] for entry in logged(out)]
    assert means and all(mean is None or math.isnan(mean) for mean in means)
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ SFT -> GRPO


def test_an_sft_adapter_continues_under_grpo_against_itself(tiny_model_dir, chart_dataset_dir, tmp_path, trained):
    sft = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "sft", "--max_steps", "2")))
    sft_weights = load_file(str(sft / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in sft_weights.items() if "lora_B" in k)

    out = train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "grpo",
                                            "--init_adapter", str(sft), "--lora_r", "8")))
    grpo_weights = load_file(str(out / "adapter_model.safetensors"))
    assert grpo_weights.keys() == sft_weights.keys()
    assert any(not torch.equal(grpo_weights[k], sft_weights[k]) for k in sft_weights)
    # The reference is the SFT adapter itself: before the first update the policy is the reference (KL 0); a
    # reference of the bare base model would already differ.
    entries = assert_finite_rewards_and_kl(out)
    assert entries[0]["kl"] == 0.0 and entries[-1]["kl"] > 0
    # Only the trained adapter is written: not TRL's frozen reference copy.
    assert not (out / "ref").exists() and not any(out.glob("checkpoint-*/ref"))
    assert json.loads((out / "chartvlm_base.json").read_text())["model_name_or_path"] == str(tiny_model_dir)
    assert not any(name for name in trained if ".ref." in name and trained[name][1]), "the reference must stay frozen"


def test_an_adapter_of_another_base_or_with_other_modules_is_refused(tiny_model_dir, chart_dataset_dir, tmp_path):
    sft = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "sft", "--max_steps", "1")))
    other = tmp_path / "other-base"
    from chartvlm.modelinit import init_model

    init_model("tiny", other, seed=1, min_pixels=TEST_MIN_PIXELS, max_pixels=TEST_MAX_PIXELS)
    with pytest.raises(ChartVLMError, match="was trained on"):
        train_main(parse_config(grpo_args(other, chart_dataset_dir, tmp_path / "a", "--init_adapter", str(sft))))
    with pytest.raises(ChartVLMError, match="train_vision_tower/train_projector ask for"):
        train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "b", "--init_adapter",
                                          str(sft), "--train_vision_tower", "true")))


# ------------------------------------------------------------------------------------------ interruption


@pytest.mark.parametrize("round_steps", [1, 2], ids=["one-step-rounds", "two-step-rounds"])
def test_an_interrupted_grpo_run_resumes_from_its_checkpoint(round_steps, tiny_model_dir, chart_dataset_dir, tmp_path,
                                                              monkeypatch, caplog):
    """With two optimizer steps per generation round (4 completions generated, 2 per step), the signal at step 1
    is answered at the round's end, step 2, and save_steps 1 saves only there and at 4: resumed mid-round, TRL
    would sample new completions for the rest of the round and the run would not be the uninterrupted one."""
    import logging
    import os
    import signal

    caplog.set_level(logging.INFO, logger="chartvlm")
    common = ["--max_steps", "4", "--save_strategy", "steps"]
    common += ["--save_steps", "100"] if round_steps == 1 else ["--save_steps", "1", "--generation_batch_size", "4"]
    straight = train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "straight", *common)))
    if round_steps == 2:
        assert sorted(path.name for path in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # Sample completions are shown once per round, at the step that generated them.
    shown = {int(record.getMessage().split()[1]) for record in caplog.records if " sample: Q=" in record.getMessage()}
    assert shown == set(range(1, 5, round_steps))
    args = grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "resumed", *common)
    original = InterruptCallback.on_step_end

    def sigterm_at(self, run_args_, state, control, **kwargs):
        if state.global_step == 3 - round_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, run_args_, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(InterruptCallback, "on_step_end", sigterm_at)
        with pytest.raises(TrainingInterrupted, match="at step 2"):
            train_main(parse_config(args))
    out = tmp_path / "resumed"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    train_main(parse_config([*args, "--resume", "true"]))

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # Rewards are logged where completions were generated: each round's first step.
    assert [entry["step"] for entry in history if "reward" in entry] == list(range(1, 5, round_steps))
    expected, got = load_file(str(straight / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ reasoning and eval


def test_a_reasoning_run_is_evaluated_as_it_was_rewarded_and_its_report_shows_the_rewards(
        tiny_model_dir, chart_dataset_dir, tmp_path):
    from chartvlm.evaluate import run_eval
    from chartvlm.prompts import REASONING_SYSTEM_MESSAGE
    from chartvlm.results import EvalResult

    out = train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "out", "--reasoning",
                                            "true", "--max_completion_length", "8", "--report_to", "tensorboard")))
    entries = logged(out)
    assert all(math.isfinite(entry["rewards/format/mean"]) for entry in entries)
    # TensorBoard has the rewards, the KL and the sample completions (text).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").iterdir()))).Reload()
    assert {"train/reward", "train/kl", "train/rewards/format/mean"} <= set(events.Tags()["scalars"])
    samples = events.Tensors("completions/text_summary")
    assert [event.step for event in samples] == [1, 2]
    assert b"| question | completion | rewards |" in samples[-1].tensor_proto.string_val[0]

    # Evaluated like any adapter, with no flag: reasoning, its prompt and its room to think come with it.
    evaluation = tmp_path / "eval"
    run_eval(parse_config(["--model_name_or_path", str(tiny_model_dir), "--adapter", str(out), "--dataset",
                           str(chart_dataset_dir), "--eval_output_dir", str(evaluation), "--eval_batch_size", "4"]),
             progress=False)
    result = EvalResult.load(evaluation)
    assert result.reasoning is True and result.system_message == REASONING_SYSTEM_MESSAGE
    assert result.generation["max_new_tokens"] == 8
    assert json.loads((evaluation / "run.json").read_text())["reasoning"] is True
    page = (evaluation / "report.html").read_text()
    assert "id='reward-curves'" in page and "GRPO training" in page and "after reasoning" in page


def test_an_sft_run_has_no_reward_section_and_its_eval_records_no_reasoning(tiny_model_dir, chart_dataset_dir,
                                                                            tmp_path):
    from chartvlm.evaluate import run_eval
    from chartvlm.results import EvalResult

    out = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "sft", "--max_steps", "1")))
    evaluation = tmp_path / "eval"
    run_eval(parse_config(["--model_name_or_path", str(tiny_model_dir), "--adapter", str(out), "--dataset",
                           str(chart_dataset_dir), "--eval_output_dir", str(evaluation)]), progress=False)
    assert EvalResult.load(evaluation).reasoning is False
    assert "reasoning" not in json.loads((evaluation / "run.json").read_text())
    assert "id='reward-curves'" not in (evaluation / "report.html").read_text()
    assert not (out / "reward_curves.png").exists()


# ------------------------------------------------------------------------------------------ bad configurations


@pytest.mark.parametrize("flags,message", [
    (["--num_generations", "3"], "generation_batch_size"),   # explicit batches that cannot hold whole groups
    (["--packing", "true"], "packing is for method sft"),
    (["--rewards", '{"nope:missing": 1}'], "cannot import 'nope'"),
    (["--num_generations", "1"], "num_generations must be a whole number of at least 2"),
    (["--num_generations", "0"], "num_generations must be a whole number of at least 2"),
    (["--temperature", "0"], "temperature must be positive"),
    (["--generation_batch_size", "0"], "generation_batch_size must be a whole number of at least 1"),
    (["--beta", "-0.1"], "beta (the KL coefficient) must not be negative"),
    (["--rewards", '{"length_penalty": 1}', "--length_penalty_buffer", "64"], "longer than max_completion_length"),
    (["--max_completion_length", "0"], "max_completion_length must be at least 1"),
    (["--method", "sft", "--reasoning", "true"], "reasoning: true trains with method grpo"),
    (["--loss_type", "nll"], "loss_type for method grpo must be one of dapo, grpo, dr_grpo"),
    (["--method", "sft", "--loss_type", "dft"], "loss_type for method sft must be one of nll, got 'dft'"),
    (["--generation_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
      "--save_strategy", "steps", "--load_best_model_at_end", "true"], "a generation round spans 2 optimizer steps"),
])
def test_bad_grpo_runs_fail_before_any_data_or_weights_are_read(flags, message, tiny_model_dir, chart_dataset_dir,
                                                                 tmp_path, monkeypatch):
    import chartvlm.modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("the configuration must be refused before anything is loaded")

    monkeypatch.setattr(chartvlm.modeling, "load_processor", no_loading)
    monkeypatch.setattr(chartvlm.modeling, "load_model", no_loading)
    extra = ["--generation_batch_size", "4"] if flags[:2] == ["--num_generations", "3"] else []
    with pytest.raises(ChartVLMError, match=re.escape(message)):
        train_main(parse_config(grpo_args(tiny_model_dir, chart_dataset_dir, tmp_path / "out", *flags, *extra)))


def test_the_options_both_trl_configs_have_reach_grpo_and_the_saved_config_says_what_ran(tmp_path):
    from chartvlm.grpo import grpo_arguments

    config = parse_config(["--method", "grpo", "--use_cpu", "true", "--output_dir", str(tmp_path)])
    assert (config.train.loss_type, config.train.shuffle_dataset) == ("dapo", True)  # TRL's GRPO defaults
    args = grpo_arguments(config, None, [1.0])
    assert (args.loss_type, args.shuffle_dataset) == ("dapo", True)
    config = parse_config(["--method", "grpo", "--use_cpu", "true", "--loss_type", "dr_grpo", "--shuffle_dataset",
                           "false", "--output_dir", str(tmp_path)])
    args = grpo_arguments(config, None, [1.0])
    assert (args.loss_type, args.shuffle_dataset) == ("dr_grpo", False)
    saved = config.save(tmp_path).read_text()
    assert "loss_type: dr_grpo" in saved and "shuffle_dataset: false" in saved
