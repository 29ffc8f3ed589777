"""The offline quick start, end to end on CPU: synthetic charts -> tiny model -> eval -> train -> eval.

Every step is the same library call the individual commands make; the log prints the equivalent
command for each, so a user can rerun any step alone.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from chartvlm.io import atomic_write_text

logger = logging.getLogger(__name__)

N_CHARTS = 600
PRESET = "tiny"
SEED = 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chartvlm quickstart", description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="Run configuration (YAML).")
    parser.add_argument("--charts", type=int, default=N_CHARTS, help="Synthetic charts to render.")
    parser.add_argument("--preset", default=PRESET, help="Model preset for `chartvlm model init`.")
    args, overrides = parser.parse_known_args(argv)
    run(args.config, overrides, args.charts, args.preset)
    return 0


def run(config_path: str, overrides: list[str], n_charts: int = N_CHARTS, preset: str = PRESET) -> dict:
    from chartvlm.config import parse_config
    from chartvlm.validate import SkippedRows
    from chartvlm.evaluate import evaluate_one, load_test_split, write_eval_report
    from chartvlm.modelinit import init_model
    from chartvlm.results import compare_table
    from chartvlm.synth import synthesize
    from chartvlm.train import main as train_main

    config = parse_config(["--config", config_path, *overrides])
    started = time.perf_counter()
    data_dir, model_dir = Path(config.data.dataset), Path(config.model.model_name_or_path)
    if not data_dir.exists():
        logger.info("step 1/5: chartvlm data synth --n %d --out %s --seed %d", n_charts, data_dir, SEED)
        synthesize(data_dir, n_charts=n_charts, seed=SEED)
    if not model_dir.exists():
        logger.info("step 2/5: chartvlm model init --preset %s --out %s", preset, model_dir)
        init_model(preset, model_dir, seed=SEED, min_pixels=config.model.min_pixels,
                   max_pixels=config.model.max_pixels)

    skipped = SkippedRows(config.data.on_bad_sample or "error")
    test_data, in_split = load_test_split(config, skipped)
    eval_dir = Path(config.eval.eval_output_dir)
    logger.info("step 3/5: chartvlm eval --config %s   (the untrained model)", config_path)
    before = evaluate_one(config, str(model_dir), None, eval_dir / "compare", test_data, skipped=skipped,
                          in_split=in_split)

    logger.info("step 4/5: chartvlm train --config %s", config_path)
    trained = train_main(config)

    logger.info("step 5/5: chartvlm eval --config %s --model_name_or_path %s", config_path, trained)
    # Each quick start trains anew: answers of an earlier run's model are not this one's (their fingerprint
    # would refuse a resume), so its folder starts empty.
    shutil.rmtree(eval_dir / "model", ignore_errors=True)
    after = evaluate_one(config, str(trained), None, eval_dir / "model", test_data, skipped=skipped,
                         in_split=in_split)

    table = compare_table(before, after, "before (random init)", "after fine-tuning")
    atomic_write_text(eval_dir / "comparison.md", table + "\n")
    report = write_eval_report(eval_dir, test_data, comparing=True, title="chartvlm quick start")
    minutes = (time.perf_counter() - started) / 60
    print(f"\nChartQA relaxed accuracy on {len(test_data)} held-out synthetic questions "
          f"({minutes:.1f} min):\n\n{table}\n\nreport: {report}\nloss curve: {Path(trained) / 'loss_curve.png'}")
    return {"before": before, "after": after, "report": str(report)}
