"""`chartvlm` command line: one subcommand per pipeline stage.

    chartvlm train     [--config FILE] [--option value ...]   fine-tune (TRL SFTTrainer; GRPOTrainer: --method grpo)
    chartvlm eval      [--config FILE] [--option value ...]   score a model on ChartQA-style data
    chartvlm predict   --model DIR [--adapter DIR] --image PNG --question TEXT [...]
    chartvlm export    --adapter DIR --out DIR                merge LoRA into a standalone model
    chartvlm serve     --model DIR [--adapter DIR] [--host H] [--port P]   OpenAI-compatible chart-QA server
    chartvlm data synth --n N --out DIR [--seed S]           render synthetic ChartQA-style charts
    chartvlm model init --preset NAME --out DIR               build a randomly initialised Qwen VL model
    chartvlm quickstart [--config configs/quickstart.yaml]    the offline end-to-end demo
    chartvlm bench {train,eval,serve}                         side-by-side speed measurements

Options of train/eval are the fields of chartvlm.config (run `chartvlm train --help`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from chartvlm.errors import ChartVLMError

logger = logging.getLogger("chartvlm")


def _setup_logging() -> None:
    from chartvlm.distributed import is_main_process, rank, world_size

    # Under torchrun / accelerate launch rank 0 logs progress, the other ranks only warnings, tagged.
    tag = f"[rank {rank()}] " if world_size() > 1 else ""
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", datefmt="%H:%M:%S")
    # Libraries we drive are chatty at INFO; keep their warnings.
    for name in ("httpx", "urllib3", "datasets", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_train(argv: list[str]) -> int:
    from chartvlm.config import parse_config
    from chartvlm.distributed import configure_cpu_launch
    from chartvlm.train import main as train_main

    configure_cpu_launch()
    train_main(parse_config(argv, prog="chartvlm train"))
    return 0


def cmd_eval(argv: list[str]) -> int:
    from chartvlm.config import parse_config
    from chartvlm.distributed import configure_cpu_launch
    from chartvlm.evaluate import run_eval

    configure_cpu_launch()
    run_eval(parse_config(argv, prog="chartvlm eval"))
    return 0


def cmd_predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chartvlm predict", description="Answer questions about chart images.",
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="Model folder or hub id (base or merged).")
    parser.add_argument("--adapter", help="LoRA adapter folder to apply.")
    parser.add_argument("--image", action="append", required=True, help="Chart image; repeat with --question.")
    parser.add_argument("--question", action="append", required=True, help="Question; one per --image.")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: the config's max_new_tokens.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--force_adapter", action="store_true",
                        help="Apply the adapter even if it was trained on another base model.")
    parser.add_argument("--prompt_style", default="chartvlm", choices=["chartvlm", "lmms-eval", "vlmevalkit"],
                        help="How questions are asked (default: as the model was trained).")
    args = parser.parse_args(argv)
    if len(args.image) != len(args.question):
        raise ChartVLMError(f"got {len(args.image)} --image but {len(args.question)} --question; pair them")
    from chartvlm.predict import predict

    for answer in predict(args.model, args.image, args.question, adapter=args.adapter,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          force_adapter=args.force_adapter, prompt_style=args.prompt_style):
        print(answer)
    return 0


def cmd_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chartvlm export", description="Merge a LoRA adapter into its base.",
                                     allow_abbrev=False)
    parser.add_argument("--adapter", required=True, help="Adapter folder written by chartvlm train.")
    parser.add_argument("--out", required=True, help="Folder for the standalone merged model + processor.")
    parser.add_argument("--model", help="Base model (default: the one recorded in the adapter).")
    parser.add_argument("--force_adapter", action="store_true",
                        help="Merge even if the adapter was trained on another base model.")
    args = parser.parse_args(argv)
    from chartvlm.predict import export_merged

    print(export_merged(args.adapter, args.out, base_model=args.model, force_adapter=args.force_adapter))
    return 0


def cmd_serve(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from chartvlm.serve import ServeLimits, ServerArguments, run_server

    parser = HfArgumentParser((ServerArguments, ServeLimits), prog="chartvlm serve", allow_abbrev=False,
                              description="Serve a model's answers about charts over an OpenAI-compatible API "
                                          "(POST /v1/chat/completions), with a page to try it at /.")
    arguments, limits = parser.parse_args_into_dataclasses(argv)
    run_server(arguments, limits)
    return 0


def cmd_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chartvlm data", description="Data tools.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="Render synthetic ChartQA-style charts with exact answers.",
                           allow_abbrev=False)
    synth.add_argument("--n", type=int, required=True, help="Number of charts.")
    synth.add_argument("--out", required=True, help="Output folder (a save_to_disk DatasetDict).")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--test_fraction", type=float, default=0.2)
    synth.add_argument("--questions_per_chart", type=int, default=3)
    synth.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    synth.add_argument("--image_size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                       help="Fixed chart size in pixels (default: random ChartQA-like sizes).")
    synth.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --out folder.")
    args = parser.parse_args(argv)
    from chartvlm.synth import synthesize

    result = synthesize(args.out, n_charts=args.n, seed=args.seed, test_fraction=args.test_fraction,
                        num_workers=args.num_workers, questions_per_chart=args.questions_per_chart,
                        image_size=tuple(args.image_size) if args.image_size else None, overwrite=args.overwrite)
    print(f"{args.out}: " + ", ".join(f"{split} {len(ds)} questions" for split, ds in result.items()))
    return 0


def cmd_model(argv: list[str]) -> int:
    from chartvlm.modelinit import PRESETS

    parser = argparse.ArgumentParser(prog="chartvlm model", description="Model tools.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="Write a randomly initialised Qwen vision-language model (offline).",
                          allow_abbrev=False)
    init.add_argument("--preset", required=True, choices=sorted(PRESETS))
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", default="ours", choices=["ours", "qwen"],
                      help="ours: a small BPE (fast, for tests); qwen: the real Qwen vocabulary (Qwen2/2.5/3-VL), "
                           "read offline from the PyPI package dashscope.")
    init.add_argument("--min_pixels", type=int, default=None)
    init.add_argument("--max_pixels", type=int, default=None)
    args = parser.parse_args(argv)
    from chartvlm.modelinit import init_model

    print(init_model(args.preset, args.out, seed=args.seed, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                     tokenizer=args.tokenizer))
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    from chartvlm.quickstart import main as quickstart_main

    return quickstart_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from chartvlm.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "export": cmd_export,
    "serve": cmd_serve,
    "data": cmd_data,
    "model": cmd_model,
    "quickstart": cmd_quickstart,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    _setup_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ChartVLMError as exc:
        # TrainingInterrupted is no error: it exits like a shell, 128 + the signal (130 SIGINT, 143 SIGTERM).
        code = getattr(exc, "exit_code", 2)
        print(f"chartvlm {argv[0]}: {'error: ' if code == 2 else ''}{exc}", file=sys.stderr)
        return code
    except OSError as exc:  # a full disk, a read-only folder, a missing file: the path and the cause, no trace
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"chartvlm {argv[0]}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chartvlm {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
