"""`chartvlm bench`: the FLOP counts behind the MFU, and both benches end to end on the tiny preset."""

import json

import pytest
import torch

from chartvlm import bench


def test_flop_counts_equal_torch_flop_counter(tiny):
    """Every matmul and convolution of the vision tower and the language model, counted by torch on the
    tiny model with eager attention (its attention is plain matmuls over the full square; ours counts the
    causal half of the language model's)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(tiny[0])
    model.set_attn_implementation("eager")
    config = model.config
    for grid in [(1, 16, 20), (1, 10, 14), (1, 8, 8)]:  # edge windows cut short in the first two
        pixels = torch.randn(grid[1] * grid[2], 1176)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model.visual(pixels, grid_thw=torch.tensor([grid]))
        assert counter.get_total_flops() == bench.model_flops_vision(config.vision_config, grid)
    text = config.text_config
    for length in (7, 64, 200):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=torch.randint(0, 100, (1, length)))
        above_diagonal = 4 * (length * length - length * (length + 1) / 2) * text.hidden_size
        assert counter.get_total_flops() == pytest.approx(
            bench.model_flops_text(text, length, length) + text.num_hidden_layers * above_diagonal, rel=1e-9)


def test_flop_counts_of_the_3b_model_on_a_chartqa_chart():
    """An 800x600 chart + ~60 text tokens on Qwen2.5-VL-3B: ~3.3 TFLOP vision, ~4.1 TFLOP language model
    (reference/pitfalls.md, every position through the LM head)."""
    from chartvlm.modelinit import build_config, build_tokenizer

    config = build_config("qwen2.5-vl-3b", build_tokenizer(4096))
    grid = (1, 42, 58)  # 588 x 812 pixels after smart_resize: 609 image tokens
    assert bench.model_flops_vision(config.vision_config, grid) == pytest.approx(3.3e12, rel=0.03)
    assert bench.model_flops_text(config.text_config, 669, 669) == pytest.approx(4.1e12, rel=0.03)
    one_answer = bench.model_flops_text(config.text_config, 669, 4)
    lora_step = bench.model_flops_train(config, [grid], [669], [4])
    assert lora_step == pytest.approx(bench.model_flops_vision(config.vision_config, grid) + 2 * one_answer)
    assert bench.model_flops_train(config, [grid], [669], [4], recompute=True) == pytest.approx(lora_step + one_answer)


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
