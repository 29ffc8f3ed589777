"""The seed's training entry point: a LoRA fine-tune of Qwen2.5-VL on ChartQA, results in ./output.

    python main.py                                   # the seed recipe (configs/seed.yaml values)
    python main.py --config configs/quickstart.yaml  # offline, after `chartvlm quickstart` made its data

The run itself is chartvlm.train.main: device set-up, data, model + processor, a sample generation
before training, LoRA, SFTConfig, SFTTrainer, evaluation, and saving to the output folder.
"""

import sys

from chartvlm.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
