"""`chartvlm bench train|eval|serve`: training, evaluation and serving recipes side by side, in one process, on the
same synthetic charts and the same random-weight model, each after a warm-up.

    chartvlm bench train [--preset small] [--recipes seed,fast] [--samples 32]
    chartvlm bench eval  [--preset small] [--recipes seed,fast] [--questions 48]
    chartvlm bench serve [--preset tiny] [--clients 16] [--requests 64] [--batch_size 8]

A recipe is a set of configuration options (train) or evaluation settings (eval); `seed` is the seed
recipe, `fast` ours, and the ones between them add one change at a time (`--recipes all`), so each
change's gain is measured on its own. For every recipe the bench prints and saves (JSON in --out, a
Markdown table appended to --markdown): samples/s, real (non-pad) tokens/s, image tokens per sample,
peak memory (process RSS on CPU, max_memory_allocated on GPU), achieved model TFLOP/s and the model
FLOPs utilisation against the device's measured matmul rate (chartvlm.flops says what is counted).
`bench eval` also checks that every recipe's answers equal the seed loop's.

`bench serve` is a load test of `chartvlm serve` on loopback: two servers in this process answer with the same model,
one a request at a time (max_batch 1) and one batching (--batch_size, --window_ms). Each request is first sent alone
(its single-request answer, and a warm-up); then, round by round in alternating order, --clients concurrent clients
send the --requests requests to each server (stopping at --max_seconds). Per server: requests/s, p50/p95 latency,
errors, the mean batch the server ran, and every answer checked against the single-request one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chartvlm import flops as model_flops
from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

# Training recipes, each the one before it plus one change: `chartvlm train` options, and
# skip_vision_backward (train.skip_frozen_vision_backward, which `chartvlm train` always applies).
SEED_TRAIN = {
    "per_device_train_batch_size": 1,
    "gradient_checkpointing": True,
    "full_logits_loss": True,
    "skip_vision_backward": False,
    "optim": "paged_adamw_32bit",  # adamw_torch without bitsandbytes + CUDA, as in the seed
    "train_sampling_strategy": "random",
    "dataloader_num_workers": 0,
}
TRAIN_STEPS = {
    "seed": {},
    "vision-no-backward": {"skip_vision_backward": True},
    "answer-head": {"full_logits_loss": False},
    "no-recompute": {"gradient_checkpointing": False},
    "batched": {"per_device_train_batch_size": "BATCH"},  # --train_batch_size
    "grouped": {"train_sampling_strategy": "group_by_length"},
    "workers": {"dataloader_num_workers": 1, "dataloader_prefetch_factor": 2},
}
# `fast`: the steps that won where they were measured. A data-loader worker takes a core from the model
# on a 2-core CPU (measured: slower), so there it stops at `grouped`.
FAST_TRAIN = {"cpu": "grouped", "cuda": "workers"}
# `packed`: fast, padding-free (chartvlm.packing): each step one row of one bin of max_length tokens.
PACKED_TRAIN = {"packing": True, "per_device_train_batch_size": 1}
# GPU-only options: recipe -> (the recipe it extends, its options, the package it needs).
TRAIN_GPU_EXTRAS = {
    "fast+liger": ("fast", {"use_liger_kernel": True}, "liger_kernel"),  # RMSNorm, SwiGLU, M-RoPE kernels
    # Liger's fused linear cross-entropy replaces the LM head + loss; it runs on the full-logits path only.
    "fast+liger-flce": ("fast", {"use_liger_kernel": True, "full_logits_loss": True}, "liger_kernel"),
    "fast+flash-attn": ("fast", {"attn_implementation": "flash_attention_2"}, "flash_attn"),
    "packed+flash-attn": ("packed", {"attn_implementation": "flash_attention_2"}, "flash_attn"),  # varlen
}

# Evaluation recipes: the seed's one-question `text_generator` loop, then run_predictions with each change.
EVAL_STEPS = {
    "seed": None,
    "batched": {"order_by_length": False, "share_vision": False, "prefetch": False},
    "sorted": {"order_by_length": True, "share_vision": False, "prefetch": False},
    "shared-vision": {"order_by_length": True, "share_vision": True, "prefetch": False},
    "prefetch": {"order_by_length": True, "share_vision": True, "prefetch": True},
    "fast": {"order_by_length": True, "share_vision": True, "prefetch": None},  # prefetch on GPU only
}

SHAPE_PRESET_CHARTS = (800, 600)  # chart size for the full-size presets (others: ChartQA-like random sizes)


def default_image_size(preset: str) -> tuple[int, int] | None:
    from chartvlm.modelinit import get_preset

    return SHAPE_PRESET_CHARTS if get_preset(preset).published else None


# ---------------------------------------------------------------------------------------------- FLOPs
def matmul_rate(device, dtype, seconds: float = 1.0) -> float:
    """The device's measured matmul FLOP/s in `dtype` (square matmuls, best of a timed loop)."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        _synchronize(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - started))
    return best


# ---------------------------------------------------------------------------------------------- measuring
def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory while the block runs: max_memory_allocated on CUDA, else the process RSS sampled every
    20 ms (includes the model, the data and Python itself)."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak_bytes = process.memory_info().rss

            def sample():
                while not self._stop.wait(0.02):
                    self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


@dataclass
class Result:
    recipe: str
    samples: int
    seconds: float
    real_tokens: int
    image_tokens: int
    flops: float
    peak_memory_bytes: int
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def row(self, peak_rate: float) -> dict:
        seconds = max(self.seconds, 1e-9)
        mfu = self.flops / seconds / peak_rate if peak_rate else None
        if mfu is not None and mfu > 1:  # above the highest measured matmul rate: that rate was wrong, say nothing
            mfu = None
        return {
            "recipe": self.recipe,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "samples_per_s": self.samples / seconds,
            "real_tokens_per_s": self.real_tokens / seconds,
            "image_tokens_per_sample": self.image_tokens / max(self.samples, 1),
            "peak_memory_mib": self.peak_memory_bytes / 2 ** 20,
            "model_tflops_per_s": self.flops / seconds / 1e12,
            "mfu": mfu,
            "settings": self.settings,
            **self.extra,
        }


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Bench:
    """What every recipe shares: device, model (built once, copied per recipe), processor, data."""

    args: argparse.Namespace
    device: object
    dtype: object
    model: object
    processor: object
    data: object  # DatasetDict with train/test

    @property
    def system_message(self) -> str:
        from chartvlm.prompts import SYSTEM_MESSAGE

        return SYSTEM_MESSAGE


def setup(args) -> Bench:
    import torch

    from chartvlm.modelinit import build_model_and_processor

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    data = synthetic_data(args)
    started = time.perf_counter()
    # Built where it runs, in the dtype it runs in (a 3B model's fp32 copy on the CPU would take minutes).
    model, processor = build_model_and_processor(args.preset, seed=args.seed, min_pixels=args.min_pixels,
                                                 max_pixels=args.max_pixels, device=device, dtype=dtype)
    if args.scramble:
        scramble(model, args.seed)
    logger.info("built %s (%.1fM parameters) in %.1fs on %s", args.preset, model.num_parameters() / 1e6,
                time.perf_counter() - started, device)
    return Bench(args, device, dtype, model, processor, data)


def pick_device(args):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def scramble(model, seed: int) -> None:
    """Weights ~ N(0, 0.15): greedy answers then vary with the chart. The plain random init repeats one
    token for every input, which would make the identical-answers check vacuous. Speed is unaffected."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * 0.15)


def synthetic_data(args):
    """Synthetic charts (chartvlm.synth), rendered once per setting into a cache folder and reused."""
    import datasets

    from chartvlm.synth import synthesize

    size = args.image_size or default_image_size(args.preset)
    tag = f"{args.charts}c-{args.questions_per_chart}q-s{args.seed}" + (f"-{size[0]}x{size[1]}" if size else "")
    folder = Path(args.data or Path(args.out) / f"data-{tag}")
    if (folder / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(folder))
    logger.info("rendering %d synthetic charts into %s", args.charts, folder)
    return synthesize(folder, n_charts=args.charts, seed=args.seed, test_fraction=0.5, num_workers=1,
                      questions_per_chart=args.questions_per_chart, image_size=size, overwrite=True)


def machine(device) -> dict:
    import torch

    info = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2)}  # other processes slow CPU timings down
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------- train
def train_recipes(names: list[str], device, batch_size: int) -> dict[str, dict]:
    """name -> cumulative options: each recipe in TRAIN_STEPS is the one before it plus its own change."""
    ladder, options = {}, dict(SEED_TRAIN)
    for name, change in TRAIN_STEPS.items():
        options = {**options, **{k: batch_size if v == "BATCH" else v for k, v in change.items()}}
        ladder[name] = dict(options)
    ladder["fast"] = dict(ladder[FAST_TRAIN.get(device.type, "workers")])
    ladder["packed"] = {**ladder["fast"], **PACKED_TRAIN}
    for name, (base, change, _) in TRAIN_GPU_EXTRAS.items():
        ladder[name] = {**ladder[base], **change}
    usable = {name for name, (_, _, package) in TRAIN_GPU_EXTRAS.items()
              if device.type == "cuda" and importlib.util.find_spec(package) is not None}
    if names == ["all"]:
        names = [*TRAIN_STEPS, "fast", "packed", *(name for name in TRAIN_GPU_EXTRAS if name in usable)]
    unknown = [n for n in names if n not in ladder]
    if unknown:
        raise ChartVLMError(f"unknown train recipe(s) {unknown}; choose from {list(ladder)} or all")
    for name in names:
        if name in TRAIN_GPU_EXTRAS and name not in usable:
            raise ChartVLMError(f"recipe {name} needs a CUDA GPU and the {TRAIN_GPU_EXTRAS[name][2]} package")
    return {name: ladder[name] for name in names}


def _flags(options: dict) -> list[str]:
    return [part for key, value in options.items() for part in (f"--{key}", str(value).lower()
                                                                if isinstance(value, bool) else str(value))]


def train_config(bench: Bench, options: dict, steps: int, output_dir: Path):
    from chartvlm.config import parse_config

    args = bench.args
    common = {
        "model_name_or_path": args.preset, "output_dir": str(output_dir), "max_steps": steps,
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "logging_steps": 1_000_000, "disable_tqdm": True, "seed": args.seed,
        "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "bf16": bench.device.type == "cuda"
        and str(bench.dtype) == "torch.bfloat16", "use_cpu": bench.device.type == "cpu",
    }
    options = {k: v for k, v in options.items() if k != "skip_vision_backward"}
    return parse_config(_flags({**common, **options}), prog="chartvlm bench train")


class _TrainMeter:
    """Counts what each training forward sees (real tokens, image tokens, FLOPs) and times the steps."""

    def __init__(self, config, image_token_id: int, full_tuning: bool):
        self.config, self.image_token_id, self.full_tuning = config, image_token_id, full_tuning
        self.reset()

    def reset(self) -> None:
        self.batches: list[tuple[int, int, int, float, int]] = []  # samples, real/image tokens, flops, positions
        self.marks: list[float] = []  # the start of training, then the end of every step

    def hook(self, module, args, kwargs):
        import torch

        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        labels, grid = kwargs.get("labels"), kwargs.get("image_grid_thw")
        if input_ids is None or not module.training:
            return
        # The supervised positions: the labels (full-logits loss) or the answer-only head's mask.
        keep = (labels[:, 1:] != -100) if labels is not None else kwargs.get("logits_to_keep")
        bounds = kwargs.get("cu_seq_lens_q")
        if bounds is not None:  # a packed row: one entry per sample
            bounds = bounds.tolist()
            lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
            flat = keep.reshape(-1).tolist() if torch.is_tensor(keep) else []
            supervised = [sum(flat[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
        else:
            lengths = mask.sum(dim=1).tolist() if mask is not None else [input_ids.shape[1]] * input_ids.shape[0]
            supervised = keep.sum(dim=1).tolist() if torch.is_tensor(keep) else [0] * len(lengths)
        grids = [tuple(g) for g in grid.tolist()] if grid is not None else []
        flops = model_flops.train_step(self.config, grids, lengths, supervised, self.full_tuning)
        self.batches.append((len(lengths), int(sum(lengths)), int((input_ids == self.image_token_id).sum()), flops,
                             input_ids.numel()))

    def callback(self, device):
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                _synchronize(device)
                meter.marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                _synchronize(device)
                meter.marks.append(time.perf_counter())

        return StepTimer()

    def result(self, recipe: str, peak: int, settings: dict) -> Result:
        real, positions = sum(b[1] for b in self.batches), sum(b[4] for b in self.batches)
        return Result(recipe, sum(b[0] for b in self.batches), self.marks[-1] - self.marks[0], real,
                      sum(b[2] for b in self.batches), sum(b[3] for b in self.batches), peak, settings,
                      {"padding": 1 - real / max(positions, 1), "steps": len(self.marks) - 1})


def run_train_recipe(bench: Bench, recipe: str, options: dict, train_data, work: Path) -> Result:
    """`warmup_steps` untimed steps, then one timed epoch over `train_data` (the same samples for every
    recipe), from the start of training (data loader start-up included) to the end of the last step."""
    import torch

    from chartvlm.train import build_trainer, check_config, resolve_optimizer

    args = bench.args
    config = train_config(bench, options, args.warmup_steps, work / recipe)
    check_config(config)
    resolve_optimizer(config.train)
    torch.manual_seed(args.seed)
    meter = _TrainMeter(bench.model.config, bench.model.config.image_token_id, config.model.tuning == "full")
    trainer = build_trainer(copy.deepcopy(bench.model), bench.processor, config, train_data,
                            callbacks=[meter.callback(bench.device)],
                            skip_vision_backward=options["skip_vision_backward"])
    model = trainer.model
    handle = model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    try:
        trainer.train()  # warm-up: max_steps = warmup_steps
        meter.reset()
        trainer.args.max_steps = -1  # then exactly one epoch
        with PeakMemory(bench.device) as memory:
            trainer.train()
    finally:
        handle.remove()
    optim = str(getattr(config.train.optim, "value", config.train.optim))  # as resolve_optimizer left it
    result = meter.result(recipe, memory.peak_bytes, {**options, "optim": optim})
    del trainer, model
    _free(bench.device)
    return result


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_train(args) -> dict:
    from chartvlm.train import sequence_lengths, with_lengths

    recipes = train_recipes(args.recipes, pick_device(args), args.train_batch_size)
    bench = setup(args)
    train_data = bench.data["train"]
    if len(train_data) < args.samples:
        raise ChartVLMError(f"the train split has {len(train_data)} samples, fewer than --samples {args.samples}: "
                            "render more with --charts")
    train_data = train_data.select(range(args.samples))
    train_data = with_lengths(train_data, sequence_lengths(train_data, bench.processor, bench.system_message))
    rounds, rate = interleaved_rounds(bench, recipes, "train",
                                      lambda name, work: run_train_recipe(bench, name, recipes[name], train_data, work))
    return summarise("train", args, bench, rounds, rate)


def alternating_rounds(names, rounds: int):
    """(round index, name) for every name in every round, the order reversed every other round: a machine that
    speeds up or slows down during the run weighs on every recipe alike."""
    for index in range(rounds):
        for name in (list(names) if index % 2 == 0 else list(reversed(names))):
            yield index, name


def interleaved_rounds(bench: Bench, recipes: dict, kind: str, run) -> tuple[dict[str, list[Result]], float]:
    """Every recipe `--rounds` times, in alternating order, and the device's matmul rate measured before each
    run: the peak is the highest of those measurements, so a moment when other work shared the machine cannot
    lower it (and inflate the MFU)."""
    rounds: dict[str, list[Result]] = {name: [] for name in recipes}
    peak = 0.0
    with tempfile.TemporaryDirectory(prefix="chartvlm-bench-") as work:
        for round_index, name in alternating_rounds(recipes, bench.args.rounds):
            peak = max(peak, matmul_rate(bench.device, bench.dtype, seconds=0.5))
            logger.info("%s recipe %s (round %d/%d)", kind, name, round_index + 1, bench.args.rounds)
            rounds[name].append(run(name, Path(work)))
            _free(bench.device)
    peak = max(peak, matmul_rate(bench.device, bench.dtype, seconds=0.5))
    return rounds, peak


# ---------------------------------------------------------------------------------------------- eval
def eval_recipes(names: list[str]) -> dict[str, dict | None]:
    if names == ["all"]:
        names = list(EVAL_STEPS)
    unknown = [n for n in names if n not in EVAL_STEPS]
    if unknown:
        raise ChartVLMError(f"unknown eval recipe(s) {unknown}; choose from {list(EVAL_STEPS)} or all")
    return {name: EVAL_STEPS[name] for name in names}


def _question_shapes(bench: Bench, dataset) -> list[tuple[tuple, int, int]]:
    """(image grid, real prompt tokens, image tokens) of every question, as the processor builds them."""
    from chartvlm.generate import generation_inputs
    from chartvlm.prompts import format_data

    image_token = bench.model.config.image_token_id
    shapes = []
    for row in dataset:
        inputs = generation_inputs([format_data(row, bench.system_message)], bench.processor)
        ids = inputs["input_ids"][0]
        shapes.append((tuple(inputs["image_grid_thw"][0].tolist()), int(ids.numel()),
                       int((ids == image_token).sum())))
    return shapes


def _answers_seed(bench: Bench, dataset) -> list[str]:
    from chartvlm.generate import text_generator
    from chartvlm.prompts import format_data

    return [text_generator(format_data(row, bench.system_message), bench.processor, bench.model, bench.device,
                           bench.args.max_new_tokens)[0] for row in dataset]


def _answers_run_predictions(bench: Bench, dataset, options: dict, work: Path) -> list[str]:
    from chartvlm.evaluate import EvalSettings, run_predictions
    from chartvlm.io import read_jsonl

    folder = Path(tempfile.mkdtemp(dir=work))
    settings = EvalSettings(model=bench.args.preset, adapter=None, dataset="bench", split="test",
                            family=bench.model.config.model_type, system_message=bench.system_message,
                            max_new_tokens=bench.args.max_new_tokens, batch_size=bench.args.batch_size,
                            min_pixels=bench.args.min_pixels, max_pixels=bench.args.max_pixels)
    run_predictions(bench.model, bench.processor, dataset, folder, settings, resume=False, progress=False,
                    **options)
    return [row["prediction"] for row in sorted(read_jsonl(folder / "predictions.jsonl"), key=lambda r: r["index"])]


def run_eval_recipe(bench: Bench, recipe: str, options: dict | None, dataset, shapes, work: Path) -> Result:
    import torch

    def answer(rows):
        if options is None:
            return _answers_seed(bench, rows)
        return _answers_run_predictions(bench, rows, options, work)

    with torch.inference_mode():
        answer(dataset.select(range(min(2, len(dataset)))))  # warm-up
        _synchronize(bench.device)
        with PeakMemory(bench.device) as memory:
            started = time.perf_counter()
            answers = answer(dataset)
            _synchronize(bench.device)
            seconds = time.perf_counter() - started
    tokenizer = bench.processor.tokenizer
    flops = sum(model_flops.generate(bench.model.config, grid, length,
                                     min(len(tokenizer(a)["input_ids"]) + 1, bench.args.max_new_tokens))
                for (grid, length, _), a in zip(shapes, answers))
    settings = {"loop": "text_generator, one question at a time"} if options is None else \
        {"batch_size": bench.args.batch_size, **options}
    if settings.get("prefetch", False) is None:
        settings["prefetch"] = f"auto ({bench.device.type == 'cuda'})"
    return Result(recipe, len(answers), seconds, sum(s[1] for s in shapes), sum(s[2] for s in shapes), flops,
                  memory.peak_bytes, settings, {"answers": answers})


def bench_eval(args) -> dict:
    recipes = eval_recipes(args.recipes)
    bench = setup(args)
    bench.model.eval()
    dataset = bench.data["test"]
    if args.questions and args.questions < len(dataset):
        dataset = dataset.select(range(args.questions))
    shapes = _question_shapes(bench, dataset)
    rounds, rate = interleaved_rounds(bench, recipes, "eval",
                                      lambda name, work: run_eval_recipe(bench, name, recipes[name], dataset, shapes,
                                                                         work))
    reference = rounds[next(iter(rounds))][0].extra["answers"]
    for results in rounds.values():
        for result in results:
            answers = result.extra.pop("answers")
            result.extra["identical_answers"] = answers == reference
            result.extra["different_answers"] = sum(a != b for a, b in zip(answers, reference))
    return summarise("eval", args, bench, rounds, rate)


# ---------------------------------------------------------------------------------------------- serve
# The load test's servers: one request at a time, and batching (max_batch and window from the command line).
SERVE_RECIPES = ("one-at-a-time", "batched")
MAX_CLIENTS = 64


def serve_limits(args, recipe: str):
    from chartvlm.serve import ServeLimits

    queue = max(32, 2 * args.clients)  # the load test measures speed, not refusals
    if recipe == "one-at-a-time":
        return ServeLimits(max_batch=1, batch_window_ms=0, queue_size=queue, max_tokens_limit=args.max_new_tokens)
    return ServeLimits(max_batch=args.batch_size, batch_window_ms=args.window_ms, queue_size=queue,
                       max_tokens_limit=args.max_new_tokens)


def served_bench_model(bench: Bench):
    """The bench's model as `chartvlm serve` serves a folder: asked with the bench's pixel limits and new tokens."""
    from chartvlm.config import parse_config
    from chartvlm.predict import InferenceSetup
    from chartvlm.prompts import control_tokens
    from chartvlm.serve import ServedModel
    from chartvlm.settings import resolve

    args = bench.args
    flags = ["--min_pixels", str(args.min_pixels), "--max_pixels", str(args.max_pixels),
             "--max_new_tokens", str(args.max_new_tokens)]
    asked = resolve(parse_config(flags, prog="chartvlm bench serve"), args.preset, log=False)
    setup = InferenceSetup(asked, bench.processor, bench.model.config.model_type,
                           control_tokens(bench.processor.tokenizer))
    return ServedModel(args.preset, setup, bench.model, args.preset)


def request_bodies(bench: Bench, rows: list[dict], name: str) -> list[bytes]:
    """One chat-completions body per row: the chart as a PNG data URI and the question, as a client sends them."""
    from chartvlm.openai_client import chat_body, image_data_uri
    from chartvlm.prompts import build_messages

    bodies = []
    for row in rows:
        conversation = build_messages(row["image"], row["query"], system_message=None)
        body = chat_body(conversation, image_data_uri(row["image"]), name, bench.args.max_new_tokens)
        bodies.append(json.dumps(body).encode())
    return bodies


def run_load(url: str, bodies: list[bytes], clients: int, max_seconds: float) -> dict:
    """`clients` threads, each with its own connection, send the next unsent body until all are sent or
    `max_seconds` have passed. Per body: (HTTP status or the connection error's name, seconds, answer or None)."""
    import httpx

    results: list = [None] * len(bodies)
    upcoming = iter(range(len(bodies)))
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max_seconds) as http:
            while time.monotonic() < deadline:
                with lock:
                    index = next(upcoming, None)
                if index is None:
                    return
                started = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", content=bodies[index],
                                         headers={"Content-Type": "application/json"})
                    status = response.status_code
                    answer = response.json()["choices"][0]["message"]["content"] if status == 200 else None
                except httpx.HTTPError as error:
                    status, answer = type(error).__name__, None
                results[index] = (status, time.perf_counter() - started, answer)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"results": results, "seconds": time.perf_counter() - started}


def load_round(recipe: str, url: str, bodies: list[bytes], reference: list[str], args) -> dict:
    """One load run against one server, summarised; the server's batch counters give its mean batch."""
    import httpx

    before = httpx.get(url + "/health").json()
    load = run_load(url, bodies, args.clients, args.max_seconds)
    after = httpx.get(url + "/health").json()
    sent = [r for r in load["results"] if r is not None]
    answered = [r for r in sent if r[0] == 200]
    wrong = sum(r[2] != reference[i] for i, r in enumerate(load["results"]) if r is not None and r[0] == 200)
    latencies = sorted(r[1] for r in answered)
    batches = after["batches"] - before["batches"]
    errors: dict[str, int] = {}
    for r in sent:
        if r[0] != 200:
            errors[str(r[0])] = errors.get(str(r[0]), 0) + 1
    return {"recipe": recipe, "requests": len(bodies), "sent": len(sent), "answered": len(answered),
            "errors": errors, "wrong_answers": wrong, "seconds": load["seconds"],
            "requests_per_s": len(answered) / load["seconds"] if answered else None,
            "p50_ms": 1000 * _percentile(latencies, 50) if latencies else None,
            "p95_ms": 1000 * _percentile(latencies, 95) if latencies else None,
            "mean_batch": (after["answered"] - before["answered"]) / batches if batches else None,
            "largest_batch": after["largest_batch"]}


def _percentile(values: list[float], percent: float) -> float:
    """Linear interpolation between the closest ranks of sorted `values` (numpy's default)."""
    position = (len(values) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def bench_serve(args) -> dict:
    import httpx

    from chartvlm.serve import ServerThread, create_app

    if not 1 <= args.clients <= MAX_CLIENTS:
        raise ChartVLMError(f"--clients must be from 1 to {MAX_CLIENTS}, got {args.clients}")
    bench = setup(args)
    bench.model.eval()
    dataset = bench.data["test"]
    rows = [dataset[i % len(dataset)] for i in range(args.requests)]  # a question asked twice must get one answer
    served = served_bench_model(bench)
    bodies = request_bodies(bench, rows, served.name)
    rounds: dict[str, list[dict]] = {name: [] for name in SERVE_RECIPES}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(ServerThread(create_app(served, serve_limits(args, name)))).url
                for name in SERVE_RECIPES}
        # Each request alone: its single-request answer (and the warm-up).
        reference = []
        with httpx.Client(base_url=urls["one-at-a-time"], timeout=args.max_seconds) as http:
            for number, body in enumerate(bodies):
                response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
                if response.status_code != 200:
                    raise ChartVLMError(f"request {number} alone got HTTP {response.status_code}: {response.text[:300]}")
                reference.append(response.json()["choices"][0]["message"]["content"])
        for round_index, name in alternating_rounds(SERVE_RECIPES, args.rounds):
            logger.info("serve recipe %s (round %d/%d): %d clients, %d requests", name, round_index + 1,
                        args.rounds, args.clients, args.requests)
            rounds[name].append(load_round(name, urls[name], bodies, reference, args))
    rows_out = []
    for name, results in rounds.items():
        # The fastest round, as for train and eval (other processes only slow a run down); the rounds' errors and
        # wrong answers are summed, so none is hidden by the choice.
        best = max(results, key=lambda r: r["requests_per_s"] or 0.0)
        best = {**best, "rounds_requests_per_s": [r["requests_per_s"] for r in results],
                "all_rounds_wrong_answers": sum(r["wrong_answers"] for r in results),
                "all_rounds_errors": sum(sum(r["errors"].values()) + r["requests"] - r["sent"] for r in results),
                "max_batch": serve_limits(args, name).max_batch}
        rows_out.append(best)
    base = rows_out[0]["requests_per_s"]
    for row in rows_out:
        row["speedup"] = row["requests_per_s"] / base if base and row["requests_per_s"] else None
    return {"kind": "serve", "command": "chartvlm bench " + " ".join(["serve", *args.argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(bench.device),
            "preset": args.preset, "dtype": str(bench.dtype).replace("torch.", ""),
            "data": {"charts": args.charts, "questions_per_chart": args.questions_per_chart,
                     "image_size": args.image_size or default_image_size(args.preset) or "ChartQA-like 400-800 x 300-600",
                     "scrambled_weights": args.scramble},
            "clients": args.clients, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
            "window_ms": args.window_ms, "rounds": args.rounds, "recipes": rows_out}


def serve_markdown(summary: dict) -> str:
    m = summary["machine"]
    where = (f"{m.get('gpu') or m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
             f"load average {m['load_average_1min']} at the end")
    rows = summary["recipes"]
    lines = [
        f"### bench serve: {summary['preset']} preset, {summary['date'][:10]}",
        "",
        f"`{summary['command']}` on {where}; {summary['dtype']}; {summary['clients']} concurrent clients, "
        f"{summary['requests']} requests per round, at most {summary['max_new_tokens']} new tokens; "
        f"{_describe_data(summary['data'])}. Clients and servers share one process, on loopback.",
        "",
        f"| server | max batch | requests/s | p50 ms | p95 ms | mean batch | errors | wrong answers | "
        f"vs {rows[0]['recipe']} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['max_batch']} | {_shown(r['requests_per_s'], '{:.2f}')} "
                     f"| {_shown(r['p50_ms'], '{:.0f}')} | {_shown(r['p95_ms'], '{:.0f}')} "
                     f"| {_shown(r['mean_batch'], '{:.1f}')} | {r['all_rounds_errors']} "
                     f"| {r['all_rounds_wrong_answers']} | {_shown(r['speedup'], '{:.2f}x')} |")
    if summary.get("rounds", 1) > 1:
        lines += ["", f"Fastest of {summary['rounds']} rounds (servers in alternating order); requests/s per round: "
                  + "; ".join(f"{r['recipe']} {', '.join(_shown(v, '{:.2f}') for v in r['rounds_requests_per_s'])}"
                              for r in rows) + ". Errors and wrong answers: all rounds together."]
    return "\n".join(lines) + "\n"


def _shown(value, form: str) -> str:
    """A measured value in `form`, or n/a when nothing was measured (never a made-up figure)."""
    return form.format(value) if value is not None else "n/a"


# ---------------------------------------------------------------------------------------------- output
def summarise(kind: str, args, bench: Bench, rounds: dict[str, list[Result]], rate: float) -> dict:
    """One row per recipe, its fastest round (other processes only ever slow a run down, as with timeit's
    best of N), and speed-ups against the first recipe."""
    rows = []
    for name, results in rounds.items():
        per_round = [r.row(rate) for r in results]
        row = max(per_round, key=lambda r: r["samples_per_s"])
        row["rounds_samples_per_s"] = [r["samples_per_s"] for r in per_round]
        rows.append(row)
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base if base else None
    return {
        "kind": kind,
        "command": "chartvlm bench " + " ".join([kind, *args.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(bench.device),
        "preset": args.preset,
        "dtype": str(bench.dtype).replace("torch.", ""),
        "matmul_tflops_per_s": rate / 1e12,
        "data": {"charts": args.charts, "questions_per_chart": args.questions_per_chart,
                 "image_size": args.image_size or default_image_size(args.preset) or "ChartQA-like 400-800 x 300-600",
                 "scrambled_weights": args.scramble},
        "rounds": args.rounds,
        "recipes": rows,
    }


def markdown(summary: dict) -> str:
    if summary["kind"] == "serve":
        return serve_markdown(summary)
    m = summary["machine"]
    where = (f"{m.get('gpu') or m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
             f"load average {m['load_average_1min']} at the end")
    unit = "samples" if summary["kind"] == "train" else "questions"
    evaluating = summary["kind"] == "eval"
    rows = summary["recipes"]
    lines = [
        f"### bench {summary['kind']}: {summary['preset']} preset, {summary['date'][:10]}",
        "",
        f"`{summary['command']}` on {where}; {summary['dtype']}; measured matmul rate "
        f"{summary['matmul_tflops_per_s']:.3f} TFLOP/s; {_describe_data(summary['data'])}.",
        "",
        f"| recipe | change | {unit}/s | real tokens/s | image tokens/{unit[:-1]} | peak memory MiB | model TFLOP/s "
        f"| MFU | vs {rows[0]['recipe']} |" + (" identical answers |" if evaluating else " padding |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if evaluating else "---:|"),
    ]
    previous = None
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        line = (f"| {r['recipe']} | {_change(previous, r['settings'])} | {r['samples_per_s']:.2f} "
                f"| {r['real_tokens_per_s']:.0f} | {r['image_tokens_per_sample']:.0f} | {r['peak_memory_mib']:.0f} "
                f"| {r['model_tflops_per_s']:.4f} | {mfu} | {r['speedup']:.2f}x |")
        if evaluating:
            line += " yes |" if r["identical_answers"] else f" no ({r['different_answers']} differ) |"
        else:
            line += f" {100 * r['padding']:.0f}% |"
        lines.append(line)
        previous = r["settings"]
    if summary.get("rounds", 1) > 1:
        lines += ["", f"Fastest of {summary['rounds']} rounds (recipes in alternating order); {unit}/s per round: "
                  + "; ".join(f"{r['recipe']} {', '.join(f'{v:.2f}' for v in r['rounds_samples_per_s'])}"
                              for r in rows) + "."]
    return "\n".join(lines) + "\n"


def _describe_data(data: dict) -> str:
    size = data["image_size"]
    size = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) else size
    weights = "random weights ~N(0, 0.15)" if data["scrambled_weights"] else "the preset's random init"
    return (f"{data['charts']} synthetic charts ({size}), {data['questions_per_chart']} questions each, "
            f"half for training, half for evaluation; {weights}")


def _change(previous: dict | None, settings: dict) -> str:
    """The settings that differ from the row above (all of them for the first row)."""
    changed = {k: v for k, v in settings.items() if previous is None or previous.get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "-"


def write_outputs(summary: dict, out: str, markdown_path: str | None) -> tuple[Path, Path | None]:
    from chartvlm.io import atomic_write_json

    stamp = summary["date"].replace(":", "").replace("-", "")
    json_path = atomic_write_json(Path(out) / f"{summary['kind']}-{summary['preset']}-{stamp}.json", summary)
    md_path = None
    if markdown_path:
        md_path = Path(markdown_path)
        with md_path.open("a", encoding="utf-8") as sink:
            sink.write("\n" + markdown(summary))
    return Path(json_path), md_path


# ---------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    from chartvlm.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    p = argparse.ArgumentParser(prog="chartvlm bench", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["train", "eval", "serve"])
    p.add_argument("--preset", default="small", help="Model preset (chartvlm model init); qwen2.5-vl-3b on GPU.")
    p.add_argument("--recipes", default="seed,fast",
                   help="Comma-separated recipes, the first is the baseline; `all` runs every step. "
                        f"train: {', '.join(TRAIN_STEPS)}, fast, packed (+ {', '.join(TRAIN_GPU_EXTRAS)} on GPU); "
                        f"eval: {', '.join(EVAL_STEPS)}.")
    p.add_argument("--samples", type=int, default=64,
                   help="train: the samples of the timed epoch (the same ones for every recipe), after the warm-up.")
    p.add_argument("--warmup_steps", type=int, default=1, help="train: untimed optimizer steps first.")
    p.add_argument("--train_batch_size", type=int, default=8, help="train: batch size from the `batched` recipe on.")
    p.add_argument("--questions", type=int, default=48, help="eval: questions answered per recipe (0 = all).")
    p.add_argument("--batch_size", type=int, default=8,
                   help="eval: questions per generation batch; serve: the batching server's max_batch.")
    p.add_argument("--max_new_tokens", type=int, default=16,
                   help="eval, serve: new-token limit, the same for every recipe (lmms-eval uses 16 for ChartQA).")
    p.add_argument("--clients", type=int, default=16, help=f"serve: concurrent clients (at most {MAX_CLIENTS}).")
    p.add_argument("--requests", type=int, default=64, help="serve: requests per round (test questions, cycled).")
    p.add_argument("--window_ms", type=float, default=10.0, help="serve: the batching server's batch_window_ms.")
    p.add_argument("--max_seconds", type=float, default=300.0,
                   help="serve: a round's clients stop sending after this many seconds (unsent requests count as "
                        "errors).")
    p.add_argument("--charts", type=int, default=80, help="Synthetic charts to render (half train, half test).")
    p.add_argument("--questions_per_chart", type=int, default=2,
                   help="Questions per chart (ChartQA: ~1.5 in train, ~1.7 in test).")
    p.add_argument("--image_size", type=lambda s: tuple(int(v) for v in s.lower().split("x")), default=None,
                   help="WIDTHxHEIGHT of every chart (default: ChartQA-like sizes; 800x600 for the 3B/7B presets).")
    p.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS)
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--rounds", type=int, default=1,
                   help="Run the recipes this many times, alternating their order; report each one's fastest round.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice).")
    p.add_argument("--scramble", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                   help="Redraw the weights ~N(0, 0.15) so answers vary with the chart (the plain random init "
                        "repeats one token for any input). Default: on for tiny/small, off for the full-size presets.")
    p.add_argument("--cpu", action="store_true", help="Stay on the CPU even where CUDA is available.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="Synthetic data folder (default: a cache under --out).")
    p.add_argument("--out", default="output/bench", help="Folder for the JSON results and the data cache.")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="Markdown file the table is appended to ('' = none).")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv[1:])
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.scramble is None:
        from chartvlm.modelinit import get_preset

        args.scramble = not get_preset(args.preset).published
    if args.samples < 1 or args.warmup_steps < 1 or args.rounds < 1 or args.batch_size < 1 or args.requests < 1:
        raise ChartVLMError("--samples, --warmup_steps, --rounds, --batch_size and --requests must be at least 1")
    summary = {"train": bench_train, "eval": bench_eval, "serve": bench_serve}[args.kind](args)
    json_path, md_path = write_outputs(summary, args.out, args.markdown or None)
    print(markdown(summary))
    print(f"saved {json_path}" + (f", appended to {md_path}" if md_path else ""))
    return 0
