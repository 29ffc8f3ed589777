"""`chartvlm eval --prompt_style lmms-eval` gives, question for question, the predictions and the scores of the
real lmms-eval 0.7.3 run offline on the same model and data (scripts/lmms_eval_parity.py). Slow: it installs
lmms-eval into its own virtual environment (about a minute) and runs it. Run with: pytest -m slow
tests/test_lmms_parity.py"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from chartvlm.config import parse_config
from chartvlm.io import read_jsonl
from conftest import scramble

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_lmms_eval_style_equals_lmms_eval_itself(tmp_path):
    import datasets

    sys.path.insert(0, str(ROOT / "scripts"))
    from lmms_eval_parity import run as run_lmms_eval

    from chartvlm.evaluate import run_eval
    from chartvlm.modelinit import build_model_and_processor
    from chartvlm.synth import synthesize

    # A model whose answers vary with the chart, with a checkpoint repetition penalty that both harnesses apply.
    model, processor = build_model_and_processor("tiny", seed=0)
    scramble(model)
    model.generation_config.repetition_penalty = 1.05
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    synthesize(tmp_path / "charts", n_charts=8, seed=3, test_fraction=0.5, num_workers=1, questions_per_chart=3)

    def chartvlm_eval(data: Path, out: Path):
        config = parse_config(["--model_name_or_path", str(tmp_path / "model"), "--dataset", str(data),
                               "--test_split", "test", "--prompt_style", "lmms-eval", "--eval_batch_size", "4",
                               "--eval_output_dir", str(out), "--report", "false"])
        return run_eval(config, progress=False)["model"], read_jsonl(out / "predictions.jsonl")

    # Label every other question with the model's own answer, so the scores are neither 0 nor 100.
    _, first = chartvlm_eval(tmp_path / "charts", tmp_path / "first")
    test = datasets.load_from_disk(str(tmp_path / "charts"))["test"]
    labels = [[row["prediction"]] if i % 2 == 0 and row["prediction"].strip() else row["labels"]
              for i, row in enumerate(first)]
    test = test.remove_columns("label").add_column("label", labels)
    datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "scored"))

    ours, rows = chartvlm_eval(tmp_path / "scored", tmp_path / "ours")
    theirs = run_lmms_eval(str(tmp_path / "model"), str(tmp_path / "scored"), "test", tmp_path / "lmms",
                           ROOT / ".cache" / "lmms-eval-venv")
    their_rows = read_jsonl(tmp_path / "lmms" / "predictions.jsonl")
    assert [row["prediction"] for row in rows] == [row["pred"] for row in their_rows]
    assert len({row["prediction"] for row in rows}) > 2, "answers must vary, or equal predictions prove nothing"
    assert 0 < ours.overall["accuracy"] < 100
    assert ours.overall["accuracy"] == pytest.approx(100 * theirs["relaxed_overall"])
    assert ours.by_split["human"]["accuracy"] == pytest.approx(100 * theirs["relaxed_human_split"])
    assert ours.by_split["augmented"]["accuracy"] == pytest.approx(100 * theirs["relaxed_augmented_split"])
    assert json.loads((tmp_path / "ours" / "metrics.json").read_text())["generation"]["repetition_penalty"] == 1.05
