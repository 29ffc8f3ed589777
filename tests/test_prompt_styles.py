"""Numbers comparable with published ones: explicit generation settings, what a trained folder carries into
evaluation and predict, the lmms-eval and VLMEvalKit prompt styles, and the whole test split by default."""

from __future__ import annotations

import copy
import logging

import pytest
from PIL import Image

from chartvlm.config import parse_config
from chartvlm.generate import generate_answers, generation_config, generation_inputs, generation_record
from chartvlm.prompts import PROMPT_STYLES, build_messages, extract_answer, format_data
from conftest import TEST_MAX_PIXELS, chart_image, chart_rows, run_args, tiny_of


def test_a_checkpoints_repetition_penalty_does_not_change_greedy_answers():
    """Qwen's instruct checkpoints ship repetition_penalty 1.05 and sampling fields in generation_config.json;
    generate() fills every field a caller leaves unset from it. chartvlm's decoding sets them all."""
    model, processor = tiny_of("qwen2_5_vl", scrambled=True)
    clean = copy.deepcopy(model)
    shipped = copy.deepcopy(model)
    shipped.generation_config.update(repetition_penalty=1.05, do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    conversations = [format_data(row) for row in chart_rows(6)]
    expected = generate_answers(clean, processor, conversations, max_new_tokens=12)
    assert generate_answers(shipped, processor, conversations, max_new_tokens=12) == expected
    assert shipped.generation_config.repetition_penalty == 1.05, "the checkpoint's own config is left as it was"
    penalised = generate_answers(shipped, processor, conversations, max_new_tokens=12, generation="checkpoint-greedy")
    assert penalised != expected, "the penalty bites on this model, so the equality above proves something"
    record = generation_record(generation_config(shipped, processor, 12))
    assert record["repetition_penalty"] == 1.0 and record["do_sample"] is False and record["max_new_tokens"] == 12
    assert "temperature" not in record and "top_k" not in record


def test_eval_and_predict_ask_with_what_training_used(tiny_model_dir, chart_dataset_dir, tmp_path, caplog):
    from chartvlm.evaluate import run_eval
    from chartvlm.modeling import load_model, load_processor
    from chartvlm.predict import predict
    from chartvlm.train import main as train_main

    system, max_pixels = "Answer with one number or word only.", 112 * 112
    adapter = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "a", "--max_steps", "1",
                                               "--system_message", system, "--max_pixels", str(max_pixels))))
    common = ["--adapter", str(adapter), "--test_split", "test", "--eval_max_new_tokens", "3", "--report", "false"]
    with caplog.at_level(logging.INFO, logger="chartvlm"):
        # run_args sets the test suite's default max_pixels as a flag: leave it out, the trained value applies.
        args = run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "e", *common)
        index = args.index("--max_pixels")
        result = run_eval(parse_config(args[:index] + args[index + 2:]), progress=False)["model"]
    assert result.system_message == system and result.pixels["max"] == max_pixels
    assert "as trained" in caplog.text and "system_message=" in caplog.text
    # A flag overrides the trained value, loudly.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chartvlm"):
        overridden = run_eval(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "o", *common)),
                              progress=False)["model"]
    assert overridden.pixels["max"] == TEST_MAX_PIXELS and "flags override" in caplog.text

    chart_image(300, 200, (30, 90, 200), [20, 60, 40]).save(tmp_path / "c.png")
    answers = predict(str(tiny_model_dir), [str(tmp_path / "c.png")], ["Which bar?"], adapter=str(adapter),
                      max_new_tokens=3)
    model = load_model(str(tiny_model_dir), adapter=str(adapter))
    processor = load_processor(str(adapter), 3136, max_pixels)
    conversation = build_messages(Image.open(tmp_path / "c.png"), "Which bar?", system_message=system)
    assert answers == generate_answers(model, processor, [conversation], max_new_tokens=3)


def test_lmms_eval_style_asks_as_lmms_eval_does():
    """lmms-eval 0.7.3, chartqa + qwen2_5_vl: no system turn (the template's default one), the question and
    "\\nAnswer the question with a single word.", qwen_vl_utils' resize to multiples of 28 and then the
    backend's min/max pixels (a 469x431 chart: 476x420, then upscaled to 504x448), 16 new tokens."""
    from chartvlm.config import parse_config
    from chartvlm.settings import resolve

    _, processor = tiny_of("qwen2_5_vl")
    asked = resolve(parse_config(["--prompt_style", "lmms-eval"]), "no-such-model")
    style = asked.style
    assert asked.system_message is None and asked.eval_max_new_tokens == 16 and asked.generation == "checkpoint-greedy"
    assert (asked.min_pixels, asked.max_pixels) == (200_704, 1_605_632)
    processor = copy.deepcopy(processor)
    from chartvlm.modeling import set_pixel_limits

    set_pixel_limits(processor, asked.min_pixels, asked.max_pixels)
    image = chart_image(469, 431, (200, 30, 30), [50, 100, 150]).convert("RGBA")
    conversation = build_messages(image, style.question("What is the highest value?"), system_message=None)
    inputs = generation_inputs([conversation], processor, style)
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 36]]  # 448 x 504 pixels
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>What is the highest value?\nAnswer the question with a single word."
                         "<|im_end|>\n<|im_start|>assistant\n")


def test_vlmevalkit_style_uses_its_qwen2_vl_prompt_for_qwen2_vl_and_the_dataset_prompt_otherwise():
    style = PROMPT_STYLES["vlmevalkit"]
    assert style.question("Q?", "qwen2_vl") == \
        "Q?\nPlease try to answer the question with short words or phrases if possible."
    assert style.question("Q?", "qwen2_5_vl") == "Q?\nAnswer the question using a single word or phrase."
    assert not style.system and style.pre_resize == (1280 * 28 * 28, 16384 * 28 * 28)


def test_answers_are_read_after_any_reasoning_block():
    assert extract_answer("  42\n") == "42"
    assert extract_answer("<think>the bar is at 40</think>\n\n40") == "40"
    assert extract_answer("reasoning...</think> Yes") == "Yes"
    assert extract_answer("<analysis>x</analysis>No") == "No"


def test_eval_scores_the_whole_test_split_unless_a_test_subset_is_asked(tiny_model_dir, chart_dataset_dir, tmp_path,
                                                                       capsys):
    from chartvlm.evaluate import run_eval

    common = ["--test_split", "train", "--eval_max_new_tokens", "2", "--report", "false"]
    seed_subset = parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "a", *common, "--subset",
                                        "0.01"))
    whole = run_eval(seed_subset, progress=False)["model"]  # the training subset does not shrink evaluation
    assert whole.questions["evaluated"] == whole.questions["in_split"] == 10 and whole.subset_line() is None
    part = run_eval(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "b", *common,
                                          "--test_subset", "0.3")), progress=False)["model"]
    assert part.questions["evaluated"] == 3
    assert "evaluating 3 of 10 questions: test_subset=0.3 (seed 42)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--prompt_style", "helm"], "prompt_style"),
                                            (["--generation_config", "sampling"], "generation_config")])
def test_unknown_prompt_styles_and_generation_modes_are_refused(flags, message):
    from chartvlm.errors import ChartVLMError

    with pytest.raises((ChartVLMError, SystemExit)):
        parse_config(flags)
