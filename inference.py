"""The seed's evaluation entry point: score a model on ChartQA with the standard relaxed accuracy.

    python inference.py --adapter output              # base model + the LoRA adapter main.py wrote
    python inference.py --config configs/quickstart.yaml --model_name_or_path output/quickstart/finetuned

Same options as `chartvlm eval`; predictions, metrics.json and report.html go to eval_output_dir.
"""

import sys

from chartvlm.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
