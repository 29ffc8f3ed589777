"""Evaluation end to end on the tiny model: predictions, metrics, compare, report; predict; export."""

import json
import re
import subprocess
import sys
import time

import pytest

from chartvlm.config import parse_config
from chartvlm.errors import ChartVLMError
from chartvlm.evaluate import EvalSettings, run_eval, run_predictions
from chartvlm.io import read_jsonl
from chartvlm.metrics import relaxed_accuracy
from conftest import TEST_MAX_PIXELS, TEST_MIN_PIXELS, chart_rows, run_args


def eval_config(model_dir, data_dir, out, *extra):
    return parse_config(run_args(model_dir, data_dir, out, "--eval_batch_size", "3", "--eval_max_new_tokens", "4",
                                 "--test_split", "test", *extra))


def test_eval_writes_one_scored_row_per_question(tiny_model_dir, chart_dataset_dir, tmp_path):
    from chartvlm.results import EvalResult

    config = eval_config(tiny_model_dir, chart_dataset_dir, tmp_path, "--report", "false")
    result = run_eval(config, progress=False)["model"]
    out = tmp_path / "eval"
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(row) >= {"id", "question", "labels", "prediction", "correct", "split", "question_type"}
        assert row["correct"] == bool(relaxed_accuracy(row["prediction"], row["labels"]))
    assert EvalResult.load(out) == result
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema"] == "chartvlm.eval/1" and metrics["overall"]["total"] == 3
    assert metrics["model"] == str(tiny_model_dir) and metrics["split"] == "test"
    assert metrics["questions"] == {"evaluated": 3, "in_split": 3, "test_subset": None, "subset_seed": 42,
                                    "skipped": 0, "duplicated": 0, "on_bad_sample": "error"}
    assert set(metrics["by_split"]) == {"human", "augmented"}
    assert metrics["metric"] == "relaxed" and metrics["prompt_style"] == "chartvlm"
    assert metrics["system_message"] == config.data.system_message
    assert metrics["prompt"].endswith("{question}<|im_end|>\n<|im_start|>assistant\n")
    assert config.data.system_message in metrics["prompt"]
    assert metrics["pixels"] == {"min": TEST_MIN_PIXELS, "max": TEST_MAX_PIXELS, "pre_resize": None}
    generation = metrics["generation"]
    assert generation["max_new_tokens"] == 4 and generation["do_sample"] is False and generation["num_beams"] == 1
    assert generation["repetition_penalty"] == 1.0 and generation["mode"] == "chartvlm"
    assert generation["padding_side"] == "left"
    assert all(metrics["fingerprint"].get(k) for k in ("model", "questions"))
    assert metrics["throughput"]["questions_per_second"] > 0


def test_resume_refuses_a_different_run(tiny, chart_dataset_dir, tmp_path):
    from chartvlm.data import load_chartqa

    model, processor = tiny
    dataset = load_chartqa(str(chart_dataset_dir), split="test")
    settings = EvalSettings(model="m", adapter=None, dataset="d", split="test", max_new_tokens=2, batch_size=2)
    run_predictions(model, processor, dataset, tmp_path, settings, progress=False)
    settings.max_new_tokens = 3
    with pytest.raises(ChartVLMError, match="different run.*max_new_tokens"):
        run_predictions(model, processor, dataset, tmp_path, settings, progress=False)


def test_torn_last_line_is_redone_not_duplicated(tiny, chart_dataset_dir, tmp_path):
    from chartvlm.data import load_chartqa

    model, processor = tiny
    dataset = load_chartqa(str(chart_dataset_dir), split="test")
    settings = EvalSettings(model="m", adapter=None, dataset="d", split="test", max_new_tokens=2, batch_size=2)
    full = run_predictions(model, processor, dataset, tmp_path / "a", settings, progress=False)
    predictions = tmp_path / "a" / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text(lines[0] + lines[1][:10])  # a writer killed mid-line
    resumed = run_predictions(model, processor, dataset, tmp_path / "a", settings, progress=False)
    assert [r["index"] for r in read_jsonl(predictions)] == [0, 1, 2]
    resumed.throughput = full.throughput = None
    assert resumed == full


def test_compare_and_report(tiny_model_dir, chart_dataset_dir, tmp_path):
    config = eval_config(tiny_model_dir, chart_dataset_dir, tmp_path, "--compare_model", str(tiny_model_dir))
    result = run_eval(config, progress=False)
    out = tmp_path / "eval"
    assert (out / "model" / "predictions.jsonl").exists() and (out / "compare" / "predictions.jsonl").exists()
    table = (out / "comparison.md").read_text()
    # The same model twice: identical predictions, zero difference on every split.
    assert "| overall |" in table and "+0.00" in table
    assert read_jsonl(out / "model" / "predictions.jsonl") == read_jsonl(out / "compare" / "predictions.jsonl")
    report = (out / "report.html").read_text()
    assert result["report"].endswith("report.html")
    assert "data:image/png;base64," in report
    assert len(re.findall(r"data-correct='[01]'", report)) == 3


def test_eval_on_the_seed_defaults_fails_fast_offline(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "chartvlm.cli", "eval"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert "quickstart" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_predict_batches_pairs_with_the_training_prompt(tiny_model_dir, tmp_path):
    from chartvlm.generate import generate_answers
    from chartvlm.modeling import load_model, load_processor
    from chartvlm.predict import predict
    from chartvlm.prompts import build_messages

    rows = chart_rows(3)
    paths = []
    for i, row in enumerate(rows):
        paths.append(str(tmp_path / f"c{i}.png"))
        row["image"].save(paths[-1])
    answers = predict(str(tiny_model_dir), paths, [r["query"] for r in rows], max_new_tokens=4, batch_size=2)
    model = load_model(str(tiny_model_dir))
    processor = load_processor(str(tiny_model_dir), TEST_MIN_PIXELS, TEST_MAX_PIXELS)
    from PIL import Image

    expected = generate_answers(model, processor, [build_messages(Image.open(p), r["query"])
                                                   for p, r in zip(paths, rows)], max_new_tokens=4)
    assert answers == expected
    with pytest.raises(ChartVLMError, match="missing.png: image file not found"):
        predict(str(tiny_model_dir), [str(tmp_path / "missing.png")], ["q"])


def test_export_merges_lora_into_a_loadable_standalone_model(tiny_model_dir, chart_dataset_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from chartvlm.collate import collate_fn
    from chartvlm.modeling import load_model, load_processor
    from chartvlm.predict import export_merged
    from chartvlm.train import main as train_main

    adapter = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "lora",
                                               "--max_steps", "2", "--lora_target_modules", "all-linear")))
    merged_dir = export_merged(str(adapter), str(tmp_path / "merged"))
    assert (merged_dir / "config.json").exists() and (merged_dir / "processor_config.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()

    processor = load_processor(str(merged_dir))
    batch = collate_fn(chart_rows(2), processor)
    batch.pop("labels")
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir)).eval()
    with_adapter = load_model(str(tiny_model_dir), adapter=str(adapter), device=torch.device("cpu")).eval()
    base = load_model(str(tiny_model_dir), device=torch.device("cpu")).eval()
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        adapter_logits = with_adapter(**batch).logits
        base_logits = base(**batch).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)
    with pytest.raises(ChartVLMError, match="not empty"):
        export_merged(str(adapter), str(merged_dir))
