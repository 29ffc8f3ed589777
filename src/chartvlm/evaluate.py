"""Evaluation: generate an answer per question, score it, stream it to disk, summarise.

`predictions.jsonl` gets one line per question as soon as its batch is done, so an interrupted
evaluation resumes where it stopped without redoing or duplicating a row. A `run.json` fingerprint
(`EvalSettings`: the weights', adapter's and questions' content, the exact prompt, pixels and generation
settings) keeps a resume from mixing two different runs. Under torchrun every rank answers its share
(`sharded_predictions`); rank 0 gathers them and writes what a single process would. The results are an
`results.EvalResult` in metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chartvlm.errors import ChartVLMError
from chartvlm.io import atomic_write_json, atomic_write_text, read_jsonl
from chartvlm.prompts import SYSTEM_MESSAGE
from chartvlm.results import EvalResult, compare_table

logger = logging.getLogger(__name__)

SPLIT_NAMES = {0: "human", 1: "augmented"}
SHARDS_DIRNAME = "shards"


@dataclass
class EvalSettings:
    """What defines an evaluation run; two runs with equal settings (but the batch size) may share a predictions
    file. A model retrained into the same folder is another model: its digest differs."""

    model: str
    adapter: str | None
    dataset: str
    split: str
    test_subset: float | int | None = None
    subset_seed: int = 42
    family: str | None = None
    prompt_style: str = "chartvlm"
    system_message: str | None = SYSTEM_MESSAGE  # None: no system turn (the template's default, if any)
    prompt: str | None = None           # the exact text before the answer, "{question}" for each question
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_new_tokens: int = 32
    generation_mode: str = "chartvlm"
    generation: dict | None = None      # every effective generation setting
    metric: str = "relaxed"
    # The question set: rows left out under on_bad_sample=skip, and exact duplicates (kept, each scored).
    on_bad_sample: str = "error"
    questions_in_split: int | None = None
    skipped_questions: int = 0
    duplicated_questions: int = 0
    model_digest: str | None = None
    adapter_digest: str | None = None
    dataset_digest: str | None = None
    batch_size: int = 8
    # Where the answers come from: generated here, or asked of an OpenAI-compatible server (openai_client).
    backend: str = "inprocess"
    base_url: str | None = None
    served_model: str | None = None
    request_concurrency: int | None = None
    # The system prompt asks for reasoning in <think>...</think> before the answer, which is scored after it.
    reasoning: bool = False

    def fingerprint(self) -> dict:
        # Batch size and concurrency change speed, not answers (batched greedy == one-at-a-time), so they may differ
        # on resume. The backend is part of the run, so a resume never mixes two; in-process runs leave its keys
        # out, as runs without reasoning leave that one, so their run.json stays the one earlier versions wrote.
        left_out = {"batch_size", "request_concurrency"}
        if self.backend == "inprocess":
            left_out |= {"backend", "base_url", "served_model"}
        if not self.reasoning:
            left_out.add("reasoning")
        return {key: value for key, value in asdict(self).items() if key not in left_out}

    def messages(self, row: dict) -> list[dict]:
        """The conversation one question is asked with (prompts.build_messages, in the prompt style)."""
        from chartvlm.prompts import build_messages, prompt_style

        question = prompt_style(self.prompt_style).question(row["query"], self.family)
        return build_messages(row["image"], question, system_message=self.system_message)


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
    expected = json.loads(json.dumps(settings.fingerprint(), default=str))
    if run_file.exists() and (out / "predictions.jsonl").exists():
        found = json.loads(run_file.read_text())
        if not resume:
            raise ChartVLMError(f"{out} already holds an evaluation; pass resume (default) or use a new folder")
        if found != expected:
            changed = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
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
                    order_by_length: bool = True, share_vision: bool = True, prefetch: bool | None = None
                    ) -> EvalResult:
    """Generate and score every row of `dataset` into out_dir/predictions.jsonl; returns the results.

    shard=(rank, world): only the rows whose index % world == rank (see `sharded_predictions`).
    order_by_length: answer the questions in `eval_order` (similar lengths batched, one chart's questions
    together); share_vision: run the vision tower once per distinct chart; prefetch: read and preprocess
    the next batch while this one generates (default: on a GPU; on a CPU the thread takes cores from the
    model and loses, see BENCHMARKS.md). None of them changes an answer."""
    from tqdm.auto import tqdm

    from chartvlm.generate import VisionCache, generate_answers
    from chartvlm.prompts import prompt_style

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
    style = prompt_style(settings.prompt_style)
    bar = tqdm(total=len(done) + len(pending), initial=len(done), unit="q", desc="eval", disable=not progress)
    batches = [pending[start : start + settings.batch_size] for start in range(0, len(pending), settings.batch_size)]
    answered = len(done)
    try:
        with predictions.open("a", encoding="utf-8") as sink:
            for indices, rows, inputs in prepared_batches(dataset, batches, processor, settings, prefetch):
                answers = generate_answers(model, processor, None, settings.max_new_tokens, share_vision=share_vision,
                                           vision_cache=vision_cache, inputs=inputs, style=style,
                                           generation=settings.generation_mode)
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
    return write_result(out, settings, questions_timed=len(pending), seconds=elapsed)


def prepared_batches(dataset, batches: list[list[int]], processor, settings: EvalSettings, prefetch: bool = True):
    """(indices, rows, generation inputs) of each batch. With prefetch, a background thread reads, decodes
    and preprocesses the next batch while the current one generates, with its own copy of the processor
    (a tokenizer is not safe to share between threads)."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from chartvlm.generate import generation_inputs
    from chartvlm.prompts import prompt_style

    own_processor = copy.deepcopy(processor) if prefetch else processor
    style = prompt_style(settings.prompt_style)

    def prepare(indices: list[int]):
        rows = [dataset[i] for i in indices]
        return indices, rows, generation_inputs([settings.messages(row) for row in rows], own_processor, style)

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

    from chartvlm.images import image_token_count

    def image_tokens(width: int, height: int) -> int:
        try:
            return image_token_count(processor, width, height)
        except ValueError:  # an unusable image: its row raises BadSampleError when it is answered
            return 0

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



def prompt_text(processor, settings: EvalSettings) -> str:
    """The exact text the model is prompted with, `{question}` standing for each question."""
    from chartvlm.prompts import build_messages, prompt_messages, prompt_style, render

    question = prompt_style(settings.prompt_style).question("{question}", settings.family)
    return render(processor, prompt_messages(build_messages(None, question, system_message=settings.system_message)),
                  generation_prompt=True)


def write_result(out: Path, settings: EvalSettings, questions_timed: int, seconds: float) -> EvalResult:
    """metrics.json: the summary of predictions.jsonl (streamed: memory does not grow with the questions) and
    everything that defines the run."""
    from chartvlm import __version__
    from chartvlm.metrics import summarise
    from chartvlm.prompts import prompt_style

    def rows():
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

    summary = summarise(rows())
    style = prompt_style(settings.prompt_style)
    result = EvalResult(
        model=settings.model, adapter=settings.adapter, dataset=settings.dataset, split=settings.split,
        questions={"evaluated": summary["overall"]["total"], "in_split": settings.questions_in_split,
                   "test_subset": settings.test_subset, "subset_seed": settings.subset_seed,
                   "skipped": settings.skipped_questions, "duplicated": settings.duplicated_questions,
                   "on_bad_sample": settings.on_bad_sample},
        metric=settings.metric, overall=summary["overall"], by_split=summary["by_split"],
        by_question_type=summary["by_question_type"], prompt_style=settings.prompt_style,
        reasoning=settings.reasoning, system_message=settings.system_message, prompt=settings.prompt,
        pixels={"min": settings.min_pixels, "max": settings.max_pixels, "pre_resize": style.pre_resize},
        generation={**(settings.generation or {}), "mode": settings.generation_mode,
                    **({"padding_side": "left", "batch_size": settings.batch_size} if settings.backend == "inprocess"
                       else {})},
        backend={"name": settings.backend} if settings.backend == "inprocess" else {
            "name": settings.backend, "base_url": settings.base_url, "served_model": settings.served_model,
            "request_concurrency": settings.request_concurrency},
        fingerprint={"model": settings.model_digest, "adapter": settings.adapter_digest,
                     "questions": settings.dataset_digest},
        throughput={"questions": questions_timed, "seconds": round(seconds, 3),
                    "questions_per_second": round(questions_timed / seconds, 3) if seconds > 0 else None},
        chartvlm_version=__version__)
    result.save(out)
    return result


# ---------------------------------------------------------------------------------------------- several ranks
def shard_dir(out_dir: str | Path, shard_rank: int, world: int) -> Path:
    return Path(out_dir) / SHARDS_DIRNAME / f"rank{shard_rank}-of-{world}"


def merge_shards(shards: list[list[dict]], total: int, where: str | Path) -> list[dict]:
    """The rows of every shard in index order, each question once; an incomplete merge is an error."""
    by_index: dict[int, dict] = {}
    for rows in shards:
        for row in rows:
            by_index.setdefault(row["index"], row)
    missing = sorted(set(range(total)) - set(by_index))
    extra = sorted(set(by_index) - set(range(total)))
    if missing or extra:
        problem = f"{len(missing)} of {total} questions missing" if missing else f"indices {extra[:5]} beyond {total}"
        raise ChartVLMError(f"{where}: merging the evaluation shards: {problem}; re-run the same command to "
                            "resume, or delete the folder to start over")
    return [by_index[i] for i in range(total)]


def _seed_shard(merged: Path, shard: Path, shard_rank: int, world: int) -> None:
    """Copy this shard's rows from an earlier merged (or single-process) predictions.jsonl, so a resumed
    run does not redo them. On a disk other ranks cannot see, the rank simply finds nothing to copy."""
    from chartvlm.io import atomic_write_text, read_jsonl

    have = read_jsonl(shard)
    known = {row["index"] for row in have}
    earlier = [row for row in read_jsonl(merged) if row["index"] % world == shard_rank and row["index"] not in known]
    if earlier:
        rows = have + earlier
        atomic_write_text(shard, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        logger.info("rank %d: %d questions already answered in %s", shard_rank, len(earlier), merged)

def sharded_predictions(model, processor, dataset, out_dir: str | Path, settings: EvalSettings, resume: bool = True,
                        progress: bool = True) -> EvalResult:
    """`run_predictions` over all ranks of a torchrun/accelerate launch; in a single process it is exactly that.

    Rank r answers the questions whose index % world == r into its own resumable folder; rank 0 gathers every
    shard through the process group (no shared disk needed), writes predictions.jsonl in index order and
    metrics.json as a single process would; every rank returns the same results (throughput: the questions of
    all ranks over the slowest rank's seconds)."""
    from chartvlm.distributed import init_process_group, rank, world_size

    world, me = world_size(), rank()
    if world == 1:
        return run_predictions(model, processor, dataset, out_dir, settings, resume=resume, progress=progress)
    import torch.distributed as dist

    init_process_group()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every rank checks, so a changed run fails everywhere (not only on rank 0 while the others wait).
    _check_or_write_fingerprint(out, settings, resume)
    mine = shard_dir(out, me, world)
    mine.mkdir(parents=True, exist_ok=True)
    _seed_shard(out / "predictions.jsonl", mine / "predictions.jsonl", me, world)
    throughput = {"questions": 0, "seconds": 0.0}
    if me < len(dataset):  # a shard with no question has nothing to run or summarise
        throughput = run_predictions(model, processor, dataset, mine, settings, resume=resume,
                                     progress=progress and me == 0, shard=(me, world)).throughput
    gathered = [None] * world if me == 0 else None
    dist.gather_object((read_jsonl(mine / "predictions.jsonl"), throughput), gathered, dst=0)
    result: list = [None]
    if me == 0:
        try:
            rows = merge_shards([shard_rows for shard_rows, _ in gathered], len(dataset), out)
            atomic_write_text(out / "predictions.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            timed = [t for _, t in gathered]
            result[0] = write_result(out, settings, questions_timed=sum(t["questions"] for t in timed),
                                     seconds=max(t["seconds"] for t in timed))
        except ChartVLMError as exc:  # every rank reports it, instead of waiting for a result
            result[0] = str(exc)
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], str):
        raise ChartVLMError(result[0])
    # The merged file now holds this shard's rows (and seeds a resume): drop the shard.
    shutil.rmtree(mine, ignore_errors=True)
    try:
        mine.parent.rmdir()
    except OSError:  # another rank's shard is still there, or it is already gone
        pass
    return result[0]


# ---------------------------------------------------------------------------------------------- the command
def load_test_split(config, skipped, controls: tuple[str, ...] = ()):
    """The split `chartvlm eval` scores: the whole test split, or the test_subset announced in one line; checked
    row by row (data.validate_rows). Returns (rows, questions in the whole split)."""
    from chartvlm.data import load_chartqa, select_subset
    from chartvlm.validate import validate_rows

    where = f"{config.data.dataset} ({config.data.test_split})"
    dataset = load_chartqa(config.data.dataset, split=config.data.test_split, on_bad_sample=skipped,
                           allow_outside_images=config.data.allow_outside_images)
    in_split = len(dataset) + len(skipped)
    dataset = select_subset(dataset, config.data.test_subset, config.data.subset_seed, where)
    if config.data.test_subset is not None:
        logger.warning("evaluating %s of %s questions: test_subset=%s", f"{len(dataset):,}", f"{in_split:,}",
                       config.data.test_subset)
    dataset, _ = validate_rows(dataset, skipped, where, control_tokens=controls)
    return dataset, in_split


def evaluate_one(config, model_path: str, adapter: str | None, out_dir: Path, dataset, progress: bool = True,
                 skipped=None, in_split: int | None = None) -> EvalResult:
    """Load one model (+ adapter), score `dataset`, write predictions and metrics (the report comes later).
    `skipped`: the data.SkippedRows of the pass that checked `dataset`, recorded in the settings.
    With backend openai the answers come from a server instead (openai_client.evaluate_through_server)."""
    if config.eval.backend == "openai":
        from chartvlm.openai_client import evaluate_through_server

        return evaluate_through_server(config, model_path, adapter, out_dir, dataset, progress, skipped, in_split)
    from chartvlm.modeling import load_model, load_processor
    from chartvlm.settings import resolve

    asked = resolve(config, model_path, adapter)
    processor = load_processor(asked.trained_folder or model_path, asked.min_pixels, asked.max_pixels)
    model = load_model(model_path, adapter=adapter, attn_implementation=config.model.attn_implementation,
                       force_adapter=config.eval.force_adapter)
    model.eval()
    settings = eval_settings(config, asked, model_path, adapter, model.config.model_type, processor, dataset, skipped,
                             in_split, model)
    logger.info("evaluating %s%s on %s/%s (%d questions, prompt style %s) -> %s", model_path,
                f" + {adapter}" if adapter else "", config.data.dataset, config.data.test_split, len(dataset),
                settings.prompt_style, out_dir)
    return sharded_predictions(model, processor, dataset, out_dir, settings, progress=progress)


def eval_settings(config, asked, model_path: str, adapter: str | None, family: str | None, processor, dataset,
                  skipped=None, in_split: int | None = None, model=None) -> EvalSettings:
    """The EvalSettings of one evaluation, whichever backend answers: `asked` (settings.resolve), the question
    set, content digests, the exact prompt and every generation setting. `model` is needed for the generation
    modes that read the checkpoint's generation_config.json, not for chartvlm's explicit greedy decoding."""
    from chartvlm.fingerprint import dataset_digest, model_digest
    from chartvlm.generate import generation_config, generation_record

    settings = EvalSettings(
        model=model_path, adapter=adapter, dataset=config.data.dataset, split=config.data.test_split,
        test_subset=config.data.test_subset, subset_seed=config.data.subset_seed, family=family,
        prompt_style=asked.style.name, system_message=asked.system_message, min_pixels=asked.min_pixels,
        max_pixels=asked.max_pixels, max_new_tokens=asked.eval_max_new_tokens, generation_mode=asked.generation,
        metric=config.eval.metric, batch_size=config.eval.eval_batch_size,
        on_bad_sample=skipped.policy if skipped is not None else config.data.on_bad_sample or "error",
        questions_in_split=in_split if in_split is not None else len(dataset),
        skipped_questions=len(skipped) if skipped is not None else 0,
        duplicated_questions=skipped.duplicates if skipped is not None else 0,
        model_digest=model_digest(model_path), adapter_digest=model_digest(adapter) if adapter else None,
        dataset_digest=dataset_digest(dataset), reasoning=asked.reasoning)
    settings.prompt = prompt_text(processor, settings)
    settings.generation = generation_record(generation_config(model, processor, settings.max_new_tokens,
                                                              settings.generation_mode))
    return settings


def run_eval(config, progress: bool = True) -> dict:
    """`chartvlm eval`: one model, or two with --compare_model/--compare_adapter, plus report.html."""
    from chartvlm.hub import ensure_hub_reachable, is_local_source
    from chartvlm.validate import SkippedRows
    from chartvlm.distributed import init_process_group, is_main_process
    from chartvlm.io import ensure_writable_dir
    from chartvlm.modeling import check_adapter, check_model_folder, load_processor
    from chartvlm.prompts import control_tokens

    init_process_group()  # under torchrun every rank answers its share; rank 0 prints and writes the rest
    main = is_main_process()
    model_path = config.model.model_name_or_path
    comparing = bool(config.eval.compare_model or config.eval.compare_adapter)
    if config.eval.backend == "openai":
        from chartvlm.openai_client import check_backend_config

        check_backend_config(config, comparing)
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
        dataset, in_split = load_test_split(config, skipped, controls)
    finally:  # also when every row was bad: the message points to this file
        if main:
            skipped.write(out)
    main_dir = out / "model" if comparing else out
    results = {"model": evaluate_one(config, model_path, config.eval.adapter, main_dir, dataset, progress, skipped,
                                     in_split)}
    if main:
        print(results["model"].accuracy_line("model"))
    if comparing:
        other = config.eval.compare_model or model_path
        results["compare"] = evaluate_one(config, other, config.eval.compare_adapter, out / "compare", dataset,
                                          progress, skipped, in_split)
        table = compare_table(results["compare"], results["model"], "compare", "model")
        if main:
            print(results["compare"].accuracy_line("compare"))
            atomic_write_text(out / "comparison.md", table + "\n")
            print(table)
    if main and results["model"].subset_line():
        print(results["model"].subset_line())
    if config.eval.report and main:
        results["report"] = str(write_eval_report(out, dataset, comparing))
        print(f"report: {results['report']}")
    return results


def write_eval_report(out: Path, dataset, comparing: bool, title: str = "chartvlm evaluation") -> Path:
    from chartvlm.report import write_report

    def load(folder: Path):
        return EvalResult.load(folder), read_jsonl(folder / "predictions.jsonl")

    def image_of(row):
        return dataset[row["index"]]["image"]

    if comparing:
        result, rows = load(out / "model")
        return write_report(out / "report.html", result, rows, image_of, baseline=load(out / "compare"), title=title)
    result, rows = load(out)
    return write_report(out / "report.html", result, rows, image_of, title=title)
