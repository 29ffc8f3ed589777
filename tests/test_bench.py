"""`chartvlm bench`: the FLOP counts behind the MFU, and both benches end to end on the tiny preset."""

import json
import re

import pytest
import torch

from chartvlm import bench, flops
from conftest import FAMILY_KINDS, tiny_of

FAMILY_IDS = [kind[0] for kind in FAMILY_KINDS]


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_flop_counts_equal_torch_flop_counter(family):
    """Every matmul and convolution of the vision tower and the language model, counted by torch on each family's
    tiny model with eager attention (its attention is plain matmuls over the full square; ours counts the causal
    half of the language model's). Qwen3.5's Gated DeltaNet core is counted in its recurrent form (flops.py),
    so there torch's count of that core (the chunked kernel) is replaced by ours."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(tiny_of(family)[0]).requires_grad_(False)  # no autograd hooks in torch's module tracker
    model.set_attn_implementation("eager")
    if model.config.text_config.model_type.endswith("moe_text"):
        model.set_experts_implementation("eager")  # torch's counter does not see grouped_mm
    config = model.config
    vc = config.vision_config
    patch_values = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    for grid in [(1, 16, 20), (1, 10, 14), (1, 8, 8)]:  # edge windows cut short in the first two (Qwen2.5-VL)
        pixels = torch.randn(grid[1] * grid[2], patch_values)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model.visual(pixels, grid_thw=torch.tensor([grid]))
        assert counter.get_total_flops() == flops.vision(vc, grid)
    text = config.text_config
    for length in (7, 64, 200):
        ids = torch.randint(0, 100, (1, length))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids))
        full_layers = sum(kind == "full_attention" for kind in getattr(text, "layer_types", None) or
                          ["full_attention"] * text.num_hidden_layers)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        above_diagonal = 4 * (length * length - length * (length + 1) / 2) * text.num_attention_heads * head_dim
        counted = counter.get_total_flops() - _delta_rule_core(counter) + _recurrent_delta_rule_flops(text, length)
        assert counted == pytest.approx(flops.text(text, length, length) + full_layers * above_diagonal, rel=1e-9)


def _delta_rule_core(counter) -> float:
    """What torch counted inside the Gated DeltaNet layers (Qwen3.5) beyond their projections: the chunked core."""
    totals = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    core = 0.0
    for name, total in totals.items():
        if name.endswith(".linear_attn"):
            core += total - sum(value for child, value in totals.items() if child.startswith(name + "."))
    return core


def _linear_layers(text) -> int:
    return sum(kind == "linear_attention" for kind in getattr(text, "layer_types", None) or [])


def _recurrent_delta_rule_flops(text, length: int) -> float:
    if not _linear_layers(text):
        return 0.0
    return _linear_layers(text) * 6 * length * text.linear_num_value_heads * text.linear_key_head_dim * \
        text.linear_value_head_dim


def test_flop_counts_of_the_3b_model_on_a_chartqa_chart():
    """An 800x600 chart + ~60 text tokens on Qwen2.5-VL-3B: ~3.3 TFLOP vision, ~4.1 TFLOP language model
    (reference/pitfalls.md, every position through the LM head)."""
    from chartvlm.modelinit import build_config, build_tokenizer_for

    config = build_config("qwen2.5-vl-3b", build_tokenizer_for("qwen2.5-vl-3b"))
    grid = (1, 42, 58)  # 588 x 812 pixels after smart_resize: 609 image tokens
    assert flops.vision(config.vision_config, grid) == pytest.approx(3.3e12, rel=0.03)
    assert flops.text(config.text_config, 669, 669) == pytest.approx(4.1e12, rel=0.03)
    one_answer = flops.text(config.text_config, 669, 4)
    lora_step = flops.train_step(config, [grid], [669], [4])
    assert lora_step == pytest.approx(flops.vision(config.vision_config, grid) + 2 * one_answer)
    assert flops.train_step(config, [grid], [669], [4], recompute=True) == pytest.approx(lora_step + one_answer)


def run_bench(tmp_path, *argv):
    markdown = tmp_path / "BENCHMARKS.md"
    code = bench.main([*argv, "--preset", "tiny", "--charts", "16", "--out", str(tmp_path / "out"),
                       "--markdown", str(markdown), "--min_pixels", "3136", "--max_pixels", str(224 * 224)])
    assert code == 0
    [result] = (tmp_path / "out").glob(f"{argv[0]}-tiny-*.json")
    return json.loads(result.read_text()), markdown.read_text()


def test_bench_train_measures_each_recipe(tmp_path, capsys):
    summary, markdown = run_bench(tmp_path, "train", "--samples", "8", "--recipes", "seed,no-recompute,fast")
    rows = {r["recipe"]: r for r in summary["recipes"]}
    assert list(rows) == ["seed", "no-recompute", "fast"]
    assert rows["seed"]["settings"]["gradient_checkpointing"] is True
    assert rows["seed"]["settings"]["full_logits_loss"] is True and rows["seed"]["settings"]["optim"] == "adamw_torch"
    assert rows["fast"]["settings"]["train_sampling_strategy"] == "group_by_length"
    assert rows["seed"]["steps"] == 8 and rows["fast"]["steps"] == 1  # one epoch of the same 8 samples
    assert all(row["samples"] == 8 for row in rows.values())
    assert rows["seed"]["image_tokens_per_sample"] == rows["fast"]["image_tokens_per_sample"]
    for row in rows.values():
        assert row["samples_per_s"] > 0 and row["real_tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        assert 4 <= row["image_tokens_per_sample"] <= 64 and row["peak_memory_mib"] > 100
    assert rows["seed"]["speedup"] == 1.0
    assert summary["machine"]["device"] == "cpu" and summary["command"].startswith("chartvlm bench train")
    assert "| seed |" in markdown and "| fast |" in markdown and "samples/s" in markdown
    assert "| fast |" in capsys.readouterr().out


def test_bench_eval_answers_equal_the_seed_loop(tmp_path):
    summary, markdown = run_bench(tmp_path, "eval", "--questions", "6", "--batch_size", "4", "--max_new_tokens", "4",
                                  "--recipes", "all")
    rows = {r["recipe"]: r for r in summary["recipes"]}
    assert list(rows) == ["seed", "batched", "sorted", "shared-vision", "prefetch", "fast"]
    assert all(row["identical_answers"] and row["different_answers"] == 0 for row in rows.values())
    assert all(row["samples"] == 6 for row in rows.values())
    assert markdown.count(" yes |") == 6
    with pytest.raises(Exception, match="unknown eval recipe"):
        bench.main(["eval", "--recipes", "seed,turbo"])


@pytest.mark.parametrize("family", [f for f in FAMILY_IDS if f != "qwen2_5_vl"])  # Qwen2.5-VL: the tests above
def test_both_benches_run_on_every_family(tmp_path, family):
    from chartvlm.modelinit import TINY_PRESETS

    preset = TINY_PRESETS[family]
    common = ["--preset", preset, "--charts", "4", "--out", str(tmp_path / "out"), "--markdown", "",
              "--min_pixels", "3136", "--max_pixels", str(112 * 112)]
    assert bench.main(["train", *common, "--samples", "2", "--recipes", "seed,fast", "--train_batch_size", "2"]) == 0
    assert bench.main(["eval", *common, "--questions", "2", "--max_new_tokens", "3", "--recipes", "seed,fast"]) == 0
    train = json.loads(next((tmp_path / "out").glob(f"train-{preset}-*.json")).read_text())
    evaluation = json.loads(next((tmp_path / "out").glob(f"eval-{preset}-*.json")).read_text())
    assert [r["recipe"] for r in train["recipes"]] == ["seed", "fast"]
    assert all(0 < r["mfu"] < 1 and r["samples"] == 2 for r in train["recipes"])
    assert all(r["identical_answers"] for r in evaluation["recipes"])


@pytest.mark.slow
def test_the_gpu_script_runs_its_steps_on_the_cpu(tmp_path):
    """scripts/gpu_bench.sh --cpu: both benches for a Qwen2.5-VL and a Qwen3-VL preset, results where it says."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_bench.sh"), "--cpu", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(re.sub(r"-\d{8}T\d{6}\.json$", "", p.name) for p in tmp_path.glob("*.json"))
    assert names == ["eval-tiny", "eval-tiny-qwen3-vl", "train-tiny", "train-tiny-qwen3-vl"]
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert table.count("### bench train") == 2 and "| packed |" in table
