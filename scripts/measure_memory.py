"""Peak memory (RSS) of loading, evaluating and training on N synthetic questions, for several N.

    .venv/bin/python scripts/measure_memory.py                       # 2,000 vs 20,000 questions
    .venv/bin/python scripts/measure_memory.py --sizes 500 5000 --stages load eval

Renders a few synthetic charts once (chartvlm.synth), then writes one JSONL file per size in which
many questions share those chart files (each question's text is made unique, so training's
duplicate check keeps them all). Every measurement runs in a fresh process with an empty datasets
cache, so it includes building the Arrow file. After the imports (torch, transformers, TRL) the
process's peak-RSS mark is reset (Linux /proc/self/clear_refs), and the table reports the RSS then
and the peak RSS of the work that follows:
  load   load_chartqa + the validation pass (data.validate_rows) over every row
  eval   `chartvlm eval` on every question (tiny model, one new token per answer, no report)
  train  `chartvlm train` (tiny model, LoRA): the whole split is loaded, validated and measured
         (sequence lengths), then --train_steps optimizer steps
Memory that does not grow with the dataset shows as equal peaks across sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Small charts, seen at most at 224x224 pixels (64 image tokens), keep a 20,000-question run short.
CHART_SIZE = (320, 240)
MIN_PIXELS, MAX_PIXELS = 3136, 224 * 224


def _memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS


class _Sampler:
    """RSS every half second in a background thread: shows whether memory creeps up during a run."""

    def __init__(self):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(_memory_mb("VmRSS"))

    def quarters(self) -> list[int]:
        """RSS at 25%, 50%, 75% and 100% of the run."""
        self._stop.set()
        self._thread.join()
        samples = self.samples or [_memory_mb("VmRSS")]
        return [round(samples[min(len(samples) - 1, len(samples) * k // 4)]) for k in range(1, 5)]


def prepare(work: Path, sizes: list[int], charts: int) -> tuple[Path, dict[int, Path]]:
    """The tiny model and one JSONL file per size, all questions sharing `charts` chart files."""
    from chartvlm.modelinit import init_model
    from chartvlm.synth import synthesize

    model = work / "tiny"
    if not model.exists():
        init_model("tiny", model, seed=0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    synth = work / "synth"
    if not synth.exists():
        synthesize(synth, n_charts=charts, seed=0, test_fraction=0.5, num_workers=1, questions_per_chart=5,
                   image_size=CHART_SIZE)
    import datasets

    images = work / "charts"
    images.mkdir(exist_ok=True)
    questions = []
    for split in ("train", "test"):
        rows = datasets.load_from_disk(str(synth))[split].cast_column("image", datasets.Image(decode=False))
        for row in rows:
            name = f"chart_{row['chart_id']}.png"
            if not (images / name).exists():
                (images / name).write_bytes(row["image"]["bytes"])
            questions.append({"image": f"charts/{name}", "query": row["query"], "label": row["label"],
                              "human_or_machine": row["human_or_machine"], "question_type": row["question_type"]})
    files = {}
    for size in sizes:
        path = work / f"questions_{size}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for index in range(size):
                question = dict(questions[index % len(questions)])
                question["query"] = f"{question['query']} (question {index})"
                handle.write(json.dumps(question) + "\n")
        files[size] = path
    return model, files


def child(stage: str, model: str, data: str, out: str, train_steps: int) -> dict:
    """One measurement, in this (fresh) process."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    import datasets  # noqa: F401 - imported before the reset, like the rest of the stack
    import transformers  # noqa: F401

    from chartvlm.config import parse_config

    common = ["--model_name_or_path", model, "--dataset", data, "--subset", "1.0", "--min_pixels", str(MIN_PIXELS),
              "--max_pixels", str(MAX_PIXELS), "--report_to", "none", "--dataloader_num_workers", "0"]
    started = time.perf_counter()
    baseline = _memory_mb("VmRSS")
    _reset_peak()
    sampler = _Sampler()
    if stage == "load":
        from chartvlm.data import load_chartqa
        from chartvlm.validate import SkippedRows, validate_rows

        skipped = SkippedRows("error")
        dataset = load_chartqa(data, split="test", on_bad_sample=skipped)
        dataset, _ = validate_rows(dataset, skipped, data)
        rows = len(dataset)
    elif stage == "eval":
        from chartvlm.evaluate import run_eval

        config = parse_config(common + ["--test_split", "test", "--eval_output_dir", out, "--eval_batch_size", "32",
                                        "--eval_max_new_tokens", "1", "--report", "false"])
        rows = run_eval(config, progress=False)["model"]["overall"]["total"]
    elif stage == "train":
        from chartvlm.train import main as train_main

        config = parse_config(common + ["--output_dir", out, "--max_steps", str(train_steps), "--eval_strategy", "no",
                                        "--save_strategy", "no", "--per_device_train_batch_size", "2",
                                        "--optim", "adamw_torch", "--gradient_checkpointing", "false",
                                        "--logging_steps", "1", "--max_new_tokens", "1"])
        train_main(config)
        rows = sum(1 for _ in open(data, encoding="utf-8"))
    else:
        raise SystemExit(f"unknown stage {stage}")
    return {"stage": stage, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "rss_after_imports_mb": round(baseline), "peak_rss_mb": round(_memory_mb("VmHWM")),
            "rss_quarters_mb": sampler.quarters()}


def measure(stage: str, size: int, model: Path, data: Path, work: Path, train_steps: int) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(scratch) / "cache"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, __file__, "--child", stage, "--model", str(model), "--data", str(data),
                   "--out", str(Path(scratch) / "out"), "--train_steps", str(train_steps)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{stage} on {size} questions failed:\n{result.stderr[-4000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "questions": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--stages", nargs="+", default=["load", "eval", "train"], choices=["load", "eval", "train"])
    parser.add_argument("--charts", type=int, default=8, help="Synthetic chart files the questions share.")
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--work", default="output/measure_memory", help="Folder for the model, charts and JSONL.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.data, args.out, args.train_steps)))
        return 0

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, files = prepare(work, args.sizes, args.charts)
    results = []
    for stage in args.stages:
        for size in args.sizes:
            results.append(measure(stage, size, model, files[size], work, args.train_steps))
            print(f"measured {stage} on {size} questions: {results[-1]}", file=sys.stderr, flush=True)
    print("| stage | questions | RSS after imports (MB) | RSS at 25/50/75/100% of the run (MB) | peak RSS (MB) "
          "| seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        quarters = " / ".join(str(v) for v in r["rss_quarters_mb"])
        print(f"| {r['stage']} | {r['questions']:,} | {r['rss_after_imports_mb']:,} | {quarters} | "
              f"{r['peak_rss_mb']:,} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
