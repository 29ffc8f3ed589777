"""A `chartvlm eval` killed midway resumes from its predictions.jsonl: every question once, same metrics."""

import dataclasses
import signal
import subprocess
import sys
import time

import pytest

from chartvlm.config import parse_config
from chartvlm.evaluate import run_eval
from chartvlm.io import read_jsonl
from chartvlm.results import EvalResult
from conftest import chart_rows, run_args

QUESTIONS = 24


@pytest.fixture(scope="module")
def questions_dir(tmp_path_factory):
    """A test split long enough (at one question per batch) to kill the evaluation in the middle of it."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    features = Features({"image": Image(), "query": Value("string"), "label": Sequence(Value("string")),
                         "human_or_machine": Value("int64")})
    path = tmp_path_factory.mktemp("data") / "questions"
    DatasetDict({"test": Dataset.from_list(chart_rows(QUESTIONS), features=features)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def scrambled_model_dir(scrambled, tmp_path_factory):
    """The scrambled tiny model on disk: its answers differ from question to question."""
    model, processor = scrambled
    path = tmp_path_factory.mktemp("models") / "scrambled"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def eval_args(model_dir, data_dir, out, batch_size):
    # The batch size changes speed, not answers: a resume may use another one.
    return run_args(model_dir, data_dir, out, "--test_split", "test", "--eval_batch_size", str(batch_size),
                    "--eval_max_new_tokens", "4", "--report", "false")


def without_throughput(result):
    return dataclasses.replace(result, throughput=None)


def test_killed_eval_resumes_to_the_uninterrupted_result(scrambled_model_dir, questions_dir, tmp_path):
    args = eval_args(scrambled_model_dir, questions_dir, tmp_path / "killed", batch_size=1)
    out = tmp_path / "killed" / "eval"
    predictions = out / "predictions.jsonl"
    log = tmp_path / "killed.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "chartvlm.cli", "eval", *args], stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + 240
            while process.poll() is None and time.monotonic() < deadline:
                if predictions.exists() and predictions.read_bytes().count(b"\n") >= 3:
                    break
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the evaluation must still be running when killed:\n" + \
        log.read_text()[-3000:]
    answered = read_jsonl(predictions)
    assert 3 <= len(answered) < QUESTIONS and not (out / "metrics.json").exists()

    resumed = run_eval(parse_config([*args, "--eval_batch_size", "8"]), progress=False)["model"]
    full = run_eval(parse_config(eval_args(scrambled_model_dir, questions_dir, tmp_path / "full", batch_size=8)),
                    progress=False)["model"]

    rows = read_jsonl(predictions)
    assert len({row["prediction"] for row in rows}) > QUESTIONS // 2, "answers must differ for the check to bite"
    assert sorted(row["index"] for row in rows) == list(range(QUESTIONS))
    assert len({row["id"] for row in rows}) == QUESTIONS
    by_index = {row["index"]: row for row in rows}
    assert all(by_index[row["index"]] == row for row in answered), "answers from before the kill are kept"
    assert resumed.throughput["questions"] == QUESTIONS - len(answered)
    assert rows == read_jsonl(tmp_path / "full" / "eval" / "predictions.jsonl")
    assert without_throughput(EvalResult.load(out)) == without_throughput(EvalResult.load(tmp_path / "full" / "eval")) \
        == without_throughput(full) == without_throughput(resumed)
