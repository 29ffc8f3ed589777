"""Evaluation: generate an answer per question, score it, stream it to disk, summarise.

`predictions.jsonl` gets one line per question as soon as its batch is done, so an interrupted
evaluation resumes where it stopped without redoing or duplicating a row. A `run.json` fingerprint
(model, data, prompt, generation settings) keeps a resume from mixing two different runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from chartvlm.errors import ChartVLMError
from chartvlm.io import atomic_write_json, atomic_write_text, read_jsonl
from chartvlm.prompts import SYSTEM_MESSAGE

logger = logging.getLogger(__name__)

SPLIT_NAMES = {0: "human", 1: "augmented"}


@dataclass
class EvalSettings:
    """What defines an evaluation run; two runs with equal settings may share a predictions file."""

    model: str
    adapter: str | None
    dataset: str
    split: str
    subset: float | None
    subset_seed: int
    system_message: str = SYSTEM_MESSAGE
    max_new_tokens: int = 32
    batch_size: int = 8
    metric: str = "relaxed"
    min_pixels: int | None = None
    max_pixels: int | None = None
    # The question set: rows left out under on_bad_sample=skip, and exact duplicates (kept, each scored).
    on_bad_sample: str = "error"
    skipped_questions: int = 0
    duplicated_questions: int = 0
    # What the answers depend on beyond the names above (chartvlm.fingerprint): the weights' and the questions'
    # content, the exact prompt text and every generation setting. A model retrained into the same folder is
    # another model.
    model_digest: str | None = None
    adapter_digest: str | None = None
    dataset_digest: str | None = None
    prompt: str | None = None
    generation: dict | None = None

    def fingerprint(self) -> dict:
        # Batch size changes speed, not answers (batched greedy == one-at-a-time), so it may differ on resume.
        found = {k: v for k, v in self.__dict__.items() if k != "batch_size"}
        if isinstance(self.generation, dict):
            found["generation"] = {k: v for k, v in self.generation.items() if k != "batch_size"}
        return found


def question_id(row: dict, index: int, split: str) -> str:
    return str(row.get("row_id") or f"{split}-{index}")


def prediction_record(row: dict, index: int, split: str, prediction: str, metric: str) -> dict:
    from chartvlm.metrics import relaxed_accuracy

    labels = [str(label) for label in row["label"]]
    return {
        "id": question_id(row, index, split),
        "index": index,
        "question": row["query"],
        "labels": labels,
        "prediction": prediction,
        "correct": bool(relaxed_accuracy(prediction, labels, metric=metric)),
        "split": SPLIT_NAMES.get(row.get("human_or_machine"), str(row.get("human_or_machine"))),
        "question_type": row.get("question_type"),
        "chart_type": row.get("chart_type"),
    }


def _check_or_write_fingerprint(out: Path, settings: EvalSettings, resume: bool) -> None:
    run_file = out / "run.json"
    expected = settings.fingerprint()
    if run_file.exists() and (out / "predictions.jsonl").exists():
        found = json.loads(run_file.read_text())
        if not resume:
            raise ChartVLMError(f"{out} already holds an evaluation; pass resume (default) or use a new folder")
        if found != expected:
            changed = sorted(k for k in expected if found.get(k) != expected[k])
            raise ChartVLMError(f"{out} holds predictions from a different run (changed: {', '.join(changed)}); "
                                "use a new eval_output_dir or delete that folder")
    atomic_write_json(run_file, expected)


def _complete_rows(predictions: Path) -> list[dict]:
    """Rows already written; a torn last line from a killed writer is cut off here."""
    rows = read_jsonl(predictions)
    if predictions.exists():
        intact = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if predictions.stat().st_size != len(intact.encode("utf-8")):
            atomic_write_text(predictions, intact)
    return rows


def run_predictions(model, processor, dataset, out_dir: str | Path, settings: EvalSettings,
                    resume: bool = True, progress: bool = True, shard: tuple[int, int] | None = None,
                    order_by_length: bool = True, share_vision: bool = True, prefetch: bool | None = None) -> dict:
    """Generate and score every row of `dataset` into out_dir/predictions.jsonl; returns metrics.

    shard=(rank, world): only the rows whose index % world == rank (see chartvlm.distributed).
    order_by_length: answer the questions in `eval_order` (similar lengths batched, one chart's questions
    together); share_vision: run the vision tower once per distinct chart; prefetch: read and preprocess
    the next batch while this one generates (default: on a GPU; on a CPU the thread takes cores from the
    model and loses, see BENCHMARKS.md). None of them changes an answer."""
    from tqdm.auto import tqdm

    from chartvlm.generate import VisionCache, generate_answers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_fingerprint(out, settings, resume)
    predictions = out / "predictions.jsonl"
    done = {row["index"] for row in _complete_rows(predictions)}
    pending = [i for i in range(len(dataset)) if i not in done and (shard is None or i % shard[1] == shard[0])]
    if done:
        logger.info("resuming: %d of %d questions already scored", len(done), len(dataset))

    started = time.perf_counter()
    if order_by_length:
        pending = eval_order(dataset, pending, processor)
    vision_cache = VisionCache() if share_vision else None
    if prefetch is None:
        prefetch = next(model.parameters()).device.type == "cuda"
    bar = tqdm(total=len(done) + len(pending), initial=len(done), unit="q", desc="eval", disable=not progress)
    batches = [pending[start : start + settings.batch_size] for start in range(0, len(pending), settings.batch_size)]
    answered = len(done)
    try:
        with predictions.open("a", encoding="utf-8") as sink:
            for indices, rows, inputs in prepared_batches(dataset, batches, processor, settings.system_message,
                                                          prefetch):
                answers = generate_answers(model, processor, None, settings.max_new_tokens,
                                           share_vision=share_vision, vision_cache=vision_cache, inputs=inputs)
                for index, row, answer in zip(indices, rows, answers):
                    record = prediction_record(row, index, settings.split, answer, settings.metric)
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                answered += len(indices)
                bar.update(len(indices))
    except OSError as error:
        raise ChartVLMError(f"writing {predictions} failed: {error.strerror}; the {answered} questions answered "
                            "before are kept: fix that and run the same command again to resume") from None
    bar.close()
    elapsed = time.perf_counter() - started
    _put_in_dataset_order(predictions)
    return write_metrics(out, settings, questions_timed=len(pending), seconds=elapsed,
                         prompt=prompt_template(processor, settings),
                         generation=generation_record(processor, settings))


def prepared_batches(dataset, batches: list[list[int]], processor, system_message: str, prefetch: bool = True):
    """(indices, rows, generation inputs) of each batch. With prefetch, a background thread reads, decodes
    and preprocesses the next batch while the current one generates, with its own copy of the processor
    (a tokenizer is not safe to share between threads)."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from chartvlm.generate import generation_inputs
    from chartvlm.prompts import format_data

    own_processor = copy.deepcopy(processor) if prefetch else processor

    def prepare(indices: list[int]):
        rows = [dataset[i] for i in indices]
        return indices, rows, generation_inputs([format_data(row, system_message) for row in rows], own_processor)

    if not prefetch:
        yield from map(prepare, batches)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-prefetch") as pool:
        upcoming = pool.submit(prepare, batches[0]) if batches else None
        for k in range(len(batches)):
            ready = upcoming.result()
            upcoming = pool.submit(prepare, batches[k + 1]) if k + 1 < len(batches) else None
            yield ready


def eval_order(dataset, indices: list[int], processor) -> list[int]:
    """`indices` with the longest prompts first and the questions about one chart side by side, so a batch
    holds charts of similar token counts (little padding) and shares their vision features. Sizes come from
    image headers and chart identities from the encoded bytes: nothing is decoded for this."""
    import hashlib

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size

    def image_tokens(width: int, height: int) -> int:
        try:
            h, w = smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"],
                                max_pixels=size["longest_edge"])
        except ValueError:  # an unusable image: its row raises BadSampleError when it is answered
            return 0
        return h * w // (factor * factor)

    keys = {}
    for index, (width, height, content) in _image_headers(dataset, indices):
        keys[index] = (-image_tokens(width, height), hashlib.blake2b(content, digest_size=16).digest(), index)
    return sorted(indices, key=keys.__getitem__)


def _image_headers(dataset, indices: list[int]):
    """(index, (width, height, identifying bytes)) of each row's image, undecoded where the dataset allows."""
    import io

    from PIL import Image

    from chartvlm.images import displayed_size

    try:
        import datasets

        undecoded = (isinstance(dataset, datasets.Dataset)
                     and isinstance(dataset.features.get("image"), datasets.Image))
    except ImportError:
        undecoded = False
    if undecoded:
        dataset = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    for index in indices:
        image = dataset[index]["image"]
        try:
            if isinstance(image, Image.Image):
                yield index, (*image.size, image.tobytes())
                continue
            content = image.get("bytes") or Path(image["path"]).read_bytes()
            with Image.open(io.BytesIO(content)) as opened:
                yield index, (*displayed_size(opened), content)
        except Exception:  # noqa: BLE001 - ordering only; the row's own error is raised when it is answered
            yield index, (0, 0, b"")


def _put_in_dataset_order(predictions: Path) -> None:
    """Rows are appended as batches finish (in eval_order); the finished file lists them by dataset index.
    Only each line's index and position are held (memory does not grow with the rows' text); the lines
    are copied in order to a temporary file that replaces the original."""
    spans, position = [], 0
    with predictions.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # a torn last line (the writer was killed) is dropped, as read_jsonl does
            spans.append((json.loads(line)["index"], position, len(line)))
            position += len(line)
    if all(a[0] <= b[0] for a, b in zip(spans, spans[1:])):
        return
    spans.sort()
    ordered = predictions.with_name(f".{predictions.name}.ordered")
    with predictions.open("rb") as source, ordered.open("wb") as sink:
        for _, start, length in spans:
            source.seek(start)
            sink.write(source.read(length))
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(ordered, predictions)


def prompt_template(processor, settings: EvalSettings) -> str:
    """The exact text the model is prompted with, `{question}` standing for each question."""
    from chartvlm.prompts import build_messages, prompt_messages

    messages = prompt_messages(build_messages(None, "{question}", system_message=settings.system_message))
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generation_record(processor, settings: EvalSettings) -> dict:
    from chartvlm.generate import generation_settings

    record = generation_settings(processor, settings.max_new_tokens)
    return {**record, "stop_token": "<|im_end|>", "padding_side": "left", "batch_size": settings.batch_size,
            "min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}


def write_metrics(out: Path, settings: EvalSettings, questions_timed: int, seconds: float,
                  prompt: str | None = None, generation: dict | None = None) -> dict:
    from chartvlm.metrics import summarise

    def rows():  # streamed: memory does not grow with the number of questions
        seen = set()
        if not (out / "predictions.jsonl").exists():
            return
        with (out / "predictions.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # a torn last line, as read_jsonl
                row = json.loads(line)
                if row["id"] in seen:
                    raise ChartVLMError(f"{out / 'predictions.jsonl'} has duplicated questions; delete it and re-run")
                seen.add(row["id"])
                yield row

    metrics = {
        **summarise(rows()),
        "settings": settings.fingerprint(),
        "prompt": prompt,
        "generation": generation,
        "throughput": {
            "questions": questions_timed,
            "seconds": round(seconds, 3),
            "questions_per_second": round(questions_timed / seconds, 3) if seconds > 0 else None,
        },
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def accuracy_line(name: str, metrics: dict) -> str:
    by_split = metrics.get("by_split", {})
    parts = [f"overall {metrics['overall']['accuracy']:.2f}"]
    parts += [f"{split} {by_split[split]['accuracy']:.2f}" for split in ("human", "augmented") if split in by_split]
    return f"{name}: " + ", ".join(parts) + f" (n={metrics['overall']['total']})"


def compare_table(base: dict, tuned: dict, base_name: str = "base", tuned_name: str = "fine-tuned") -> str:
    """A Markdown table of accuracy per split, with the difference."""
    keys = [("overall", base["overall"], tuned["overall"])]
    for split in ("human", "augmented"):
        if split in base.get("by_split", {}) and split in tuned.get("by_split", {}):
            keys.append((split, base["by_split"][split], tuned["by_split"][split]))
    lines = [f"| split | {base_name} | {tuned_name} | difference |", "|---|---:|---:|---:|"]
    for name, b, t in keys:
        lines.append(f"| {name} | {b['accuracy']:.2f} | {t['accuracy']:.2f} | {t['accuracy'] - b['accuracy']:+.2f} |")
    return "\n".join(lines)


def pixel_limits(config, adapter: str | None) -> tuple[int, int]:
    """Evaluate with the pixels the adapter was trained with (saved in its run config), else the config's."""
    from chartvlm.config import load_run_config

    trained = load_run_config(adapter).get("model", {}) if adapter else {}
    limits = (trained.get("min_pixels", config.model.min_pixels), trained.get("max_pixels", config.model.max_pixels))
    if trained and limits != (config.model.min_pixels, config.model.max_pixels):
        logger.warning("using the adapter's training pixel limits %s, not the config's", limits)
    return limits


def evaluate_one(config, model_path: str, adapter: str | None, out_dir: Path, dataset, progress: bool = True,
                 skipped=None) -> dict:
    """Load one model (+ adapter), score `dataset`, write predictions/metrics (and the report later).
    `skipped`: the data.SkippedRows of the pass that checked `dataset`, recorded in the settings."""
    from chartvlm.distributed import sharded_predictions
    from chartvlm.fingerprint import dataset_digest, model_digest
    from chartvlm.modeling import load_model, load_processor

    min_pixels, max_pixels = pixel_limits(config, adapter)
    settings = EvalSettings(
        model=model_path, adapter=adapter, dataset=config.data.dataset, split=config.data.test_split,
        subset=config.data.subset, subset_seed=config.data.subset_seed, system_message=config.data.system_message,
        max_new_tokens=config.eval.eval_max_new_tokens, batch_size=config.eval.eval_batch_size,
        metric=config.eval.metric, min_pixels=min_pixels, max_pixels=max_pixels,
    )
    if skipped is not None:
        settings.on_bad_sample = skipped.policy
        settings.skipped_questions, settings.duplicated_questions = len(skipped), skipped.duplicates
    else:
        settings.on_bad_sample = config.data.on_bad_sample or "error"
    processor = load_processor(model_path, min_pixels, max_pixels)
    model = load_model(model_path, adapter=adapter, attn_implementation=config.model.attn_implementation,
                       force_adapter=config.eval.force_adapter)
    model.eval()
    settings.model_digest = model_digest(model_path)
    settings.adapter_digest = model_digest(adapter) if adapter else None
    settings.dataset_digest = dataset_digest(dataset)
    settings.prompt = prompt_template(processor, settings)
    settings.generation = generation_record(processor, settings)
    logger.info("evaluating %s%s on %s/%s (%d questions) -> %s", model_path, f" + {adapter}" if adapter else "",
                config.data.dataset, config.data.test_split, len(dataset), out_dir)
    return sharded_predictions(model, processor, dataset, out_dir, settings, progress=progress)


def run_eval(config, progress: bool = True) -> dict:
    """`chartvlm eval`: one model, or two with --compare_model/--compare_adapter, plus report.html."""
    from chartvlm.data import SkippedRows, ensure_hub_reachable, is_local_source, load_chartqa, validate_rows
    from chartvlm.distributed import init_process_group, is_main_process
    from chartvlm.io import ensure_writable_dir
    from chartvlm.modeling import check_adapter, check_model_folder, load_processor
    from chartvlm.prompts import control_tokens

    init_process_group()  # under torchrun every rank answers its share; rank 0 prints and writes the rest
    main = is_main_process()
    model_path = config.model.model_name_or_path
    comparing = bool(config.eval.compare_model or config.eval.compare_adapter)
    models = [(model_path, config.eval.adapter)]
    if comparing:
        models.append((config.eval.compare_model or model_path, config.eval.compare_adapter))
    # Everything that can be checked without loading a model is checked first.
    for path, adapter in models:
        check_model_folder(path)
        if not is_local_source(path):
            ensure_hub_reachable(path, repo_type="model")
        if adapter:
            check_adapter(adapter, path, config.eval.force_adapter)
    if not is_local_source(config.data.dataset):
        ensure_hub_reachable(config.data.dataset, repo_type="dataset")
    out = ensure_writable_dir(config.eval.eval_output_dir, "eval_output_dir")
    controls = tuple({token for path, _ in models for token in control_tokens(load_processor(path).tokenizer)})
    # on_bad_sample defaults to error here: a metric is never computed on a silently smaller set.
    skipped = SkippedRows(config.data.on_bad_sample or "error")
    try:
        dataset = load_chartqa(config.data.dataset, split=config.data.test_split, subset=config.data.subset,
                               seed=config.data.subset_seed, on_bad_sample=skipped,
                               allow_outside_images=config.data.allow_outside_images)
        dataset, _ = validate_rows(dataset, skipped, f"{config.data.dataset} ({config.data.test_split})",
                                   control_tokens=controls)
    finally:  # also when every row was bad: the message points to this file
        if main:
            skipped.write(out)
    main_dir = out / "model" if comparing else out
    results = {"model": evaluate_one(config, model_path, config.eval.adapter, main_dir, dataset, progress, skipped)}
    if main:
        print(accuracy_line("model", results["model"]))
    if comparing:
        other = config.eval.compare_model or model_path
        results["compare"] = evaluate_one(config, other, config.eval.compare_adapter, out / "compare", dataset,
                                          progress, skipped)
        table = compare_table(results["compare"], results["model"], "compare", "model")
        if main:
            print(accuracy_line("compare", results["compare"]))
            atomic_write_text(out / "comparison.md", table + "\n")
            print(table)
    if config.eval.report and main:
        results["report"] = str(write_eval_report(out, dataset, comparing))
        print(f"report: {results['report']}")
    return results


def write_eval_report(out: Path, dataset, comparing: bool, title: str = "chartvlm evaluation") -> Path:
    from chartvlm.report import write_report

    def load(folder: Path):
        return json.loads((folder / "metrics.json").read_text()), read_jsonl(folder / "predictions.jsonl")

    def image_of(row):
        return dataset[row["index"]]["image"]

    if comparing:
        metrics, rows = load(out / "model")
        return write_report(out / "report.html", metrics, rows, image_of, baseline=load(out / "compare"), title=title)
    metrics, rows = load(out)
    return write_report(out / "report.html", metrics, rows, image_of, title=title)
