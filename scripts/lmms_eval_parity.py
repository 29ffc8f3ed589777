"""Run the real lmms-eval 0.7.3 ChartQA task (its qwen2_5_vl backend) offline on a local model and data, to
compare with `chartvlm eval --prompt_style lmms-eval` (tests/test_lmms_parity.py, marked slow).

    python scripts/lmms_eval_parity.py --model MODEL_DIR --data DATA_DIR --split test --out OUT [--venv VENV]

- The venv (default .cache/lmms-eval-venv) gets lmms-eval and exactly the packages its chartqa/qwen2_5_vl path
  imports, without their dependencies; torch, transformers and datasets come from this project's environment
  (a .pth file appends its site-packages after the venv's own, so filelock<4, which lmms-eval needs, wins).
  lmms-eval imports `decord` without declaring it, and breaks with filelock >= 4.
- The data (a chartvlm dataset folder) is written as a parquet in lmms-lab's ChartQA schema (type, question,
  answer, image); a task file includes the installed chartqa.yaml and replaces only the data source.
- The backend hard-codes bfloat16 (models/simple/qwen2_5_vl.py); a wrapper changes only that, to float32,
  so the comparison is exact on CPU.
- lmms-eval exits 0 even when it failed: the run is judged by the files it wrote.

Writes OUT/predictions.jsonl (doc_id, type, question, answer, pred, score) and OUT/scores.json (fractions 0-1).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

PINS = ["lmms-eval==0.7.3", "qwen-vl-utils==0.0.14", "decord==0.6.0", "filelock==3.32.7", "loguru==0.7.3",
        "sacrebleu==2.6.0", "portalocker==4.4.2", "tabulate==0.10.0", "colorama==0.4.6", "lxml==6.2.0",
        "evaluate==0.4.6", "requests==2.34.2", "pytz==2026.6", "tenacity==9.2.1", "aiohttp==3.14.5",
        "multidict==7.2.1", "yarl==1.25.1", "propcache==0.5.4", "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0",
        "frozenlist==1.8.0", "pytablewriter==1.2.1", "DataProperty==1.1.1", "typepy==1.3.5", "mbstrdecoder==1.1.5",
        "tabledata==1.3.5", "tcolorpy==0.1.7", "pathvalidate==3.3.1", "chardet==6.0.0.post1"]

# Loads the backend's model in float32 instead of its hard-coded bfloat16; everything else is lmms-eval's CLI.
RUNNER = '''
import sys
import lmms_eval.models.simple.qwen2_5_vl as backend
original = backend.Qwen2_5_VLForConditionalGeneration

class Float32:
    @staticmethod
    def from_pretrained(path, *args, **kwargs):
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = "float32"
        return original.from_pretrained(path, *args, **kwargs)

backend.Qwen2_5_VLForConditionalGeneration = Float32
from lmms_eval.__main__ import cli_evaluate
cli_evaluate()
'''


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if (venv / ".chartvlm-ready").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz_chartvlm_project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *PINS], check=True)
    (venv / ".chartvlm-ready").write_text("ok\n")
    return python


def to_lmms_parquet(data: str, split: str, out: Path) -> Path:
    """A chartvlm dataset split in lmms-lab's ChartQA schema; images keep their encoded bytes."""
    import datasets

    from chartvlm.data import load_chartqa

    rows = load_chartqa(data, split=split).cast_column("image", datasets.Image(decode=False))
    table = {"type": [], "question": [], "answer": [], "image": []}
    for row in rows:
        image = row["image"]
        table["type"].append("human_test" if row["human_or_machine"] == 0 else "augmented_test")
        table["question"].append(row["query"])
        table["answer"].append(row["label"][0])
        table["image"].append({"bytes": image["bytes"] or Path(image["path"]).read_bytes(), "path": None})
    features = datasets.Features({"type": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    path = out / "chartqa_test.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


def run(model: str, data: str, split: str, out: Path, venv: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(venv)
    parquet = to_lmms_parquet(data, split, out)
    chartqa_yaml = subprocess.run(
        [str(python), "-c", "import os, lmms_eval.tasks as t; print(os.path.join(os.path.dirname(t.__file__), "
                            "'chartqa', 'chartqa.yaml'))"],
        check=True, capture_output=True, text=True, env=_env(out)).stdout.strip()
    task = out / "task"
    task.mkdir(exist_ok=True)
    (task / "chartqa_local.yaml").write_text(
        f"include: {chartqa_yaml}\ntask: chartqa_local\ndataset_path: parquet\ndataset_kwargs:\n"
        f"  data_files:\n    test: {parquet}\n")
    results = out / "results"
    log = out / "lmms-eval.log"
    with log.open("w") as sink:
        subprocess.run([str(python), "-c", RUNNER, "--model", "qwen2_5_vl", "--model_args",
                        f"pretrained={Path(model).resolve()},device_map=cpu", "--device", "cpu",
                        "--tasks", "chartqa_local", "--include_path", str(task), "--batch_size", "1",
                        "--log_samples", "--log_samples_suffix", "chartqa_local", "--output_path", str(results)],
                       env=_env(out), stdout=sink, stderr=subprocess.STDOUT, timeout=1800)
    found = sorted(glob.glob(str(results / "*" / "*_results.json")))
    samples = sorted(glob.glob(str(results / "*" / "*_samples_chartqa_local.jsonl")))
    if not found or not samples:
        raise SystemExit(f"lmms-eval wrote no results (it exits 0 after errors); see {log}")
    scores = json.loads(Path(found[-1]).read_text())["results"]["chartqa_local"]
    by_doc = {}
    for line in Path(samples[-1]).read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        by_doc[sample["doc_id"]] = sample
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as sink:
        for doc_id in sorted(by_doc):
            sample = by_doc[doc_id]
            prediction = sample["filtered_resps"]
            prediction = prediction[0] if isinstance(prediction, list) else prediction
            sink.write(json.dumps({"doc_id": doc_id, "pred": prediction, "score": sample["relaxed_overall"]},
                                  ensure_ascii=False) + "\n")
    summary = {name: scores.get(f"{name},none") for name in
               ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split")}
    (out / "scores.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _env(out: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # filelock 4 must not win
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", HF_DATASETS_CACHE=str(out / "hf-cache"))
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True)
    parser.add_argument("--venv", default=".cache/lmms-eval-venv")
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.data, args.split, Path(args.out), Path(args.venv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
