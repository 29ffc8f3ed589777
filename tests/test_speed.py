"""The speed paths change nothing but speed: answer-only LM head == full logits (loss and gradients),
length-grouped batches, and the fast evaluation (sorted, batched, one vision pass per chart) == the seed's
one-question loop."""

import copy
import json

import pytest
import torch

from chartvlm.collate import IGNORE_INDEX, collate_fn
from chartvlm.config import parse_config
from chartvlm.train import supervised_loss, with_lengths, with_supervised_loss
from conftest import chart_image, chart_rows


def loss_and_grads(model, batch, num_items, full_logits):
    model.zero_grad(set_to_none=True)
    loss, outputs = supervised_loss(model, dict(batch), num_items, full_logits=full_logits)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, outputs.logits.shape


def assert_same_grads(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert (got[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-12, name


def test_answer_only_head_gives_the_full_logits_loss_and_gradients(tiny):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    batch = collate_fn(chart_rows(4), processor)  # four image sizes: padded rows
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    vocab = model.config.text_config.vocab_size
    for num_items in (None, torch.tensor(supervised + 5)):  # this batch alone / part of an accumulated batch
        loss, grads, shape = loss_and_grads(model, batch, num_items, full_logits=False)
        full_loss, full_grads, full_shape = loss_and_grads(model, batch, num_items, full_logits=True)
        assert shape == (supervised, vocab)  # the head ran on the supervised positions only
        assert full_shape == (*batch["input_ids"].shape, vocab)
        assert torch.allclose(loss, full_loss, rtol=1e-6, atol=0)
        assert len(grads) > 40  # every language-model weight, the head and the vision tower
        assert_same_grads(grads, full_grads)
    # The mean over this batch's supervised tokens, and the sum over num_items_in_batch.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="sum",
                                            ignore_index=IGNORE_INDEX)
    assert torch.allclose(supervised_loss(model, dict(batch))[0], nll / supervised, rtol=1e-6)
    assert torch.allclose(supervised_loss(model, dict(batch), torch.tensor(supervised + 5))[0],
                          nll / (supervised + 5), rtol=1e-6)


def test_frozen_vision_tower_gets_no_backward_and_the_gradients_stay(tiny):
    """Gradient checkpointing + PEFT make the vision patch embedding's output require grad; with the hook the
    frozen tower's output is detached (no backward, no recomputation through it) and nothing else changes."""
    from chartvlm.modeling import prepare_for_training
    from chartvlm.train import skip_frozen_vision_backward

    batch = collate_fn(chart_rows(2), tiny[1])
    grads, tracked = {}, {}
    for skip in (False, True):
        torch.manual_seed(0)
        model = prepare_for_training(copy.deepcopy(tiny[0]), parse_config(["--lora_dropout", "0"]).model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if skip:
            assert skip_frozen_vision_backward(model)
        visual = next(m for name, m in model.named_modules() if name.endswith(".visual"))
        visual.register_forward_hook(lambda m, args, out: tracked.__setitem__(skip, out.pooler_output.requires_grad))
        model.train()
        loss, _ = supervised_loss(model, dict(batch))
        loss.backward()
        grads[skip] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert tracked == {False: True, True: False}
    assert len(grads[True]) > 4
    assert_same_grads(grads[True], grads[False])
    with_vision_lora = parse_config(["--lora_include_vision", "true", "--lora_target_modules", "all-linear"]).model
    vision_lora = prepare_for_training(copy.deepcopy(tiny[0]), with_vision_lora)
    assert not skip_frozen_vision_backward(vision_lora)  # its vision LoRA needs the backward


def trainer_for(tiny, tmp_path, *flags):
    from datasets import Dataset
    from trl import SFTTrainer

    from chartvlm.collate import make_collator
    from chartvlm.modeling import prepare_for_training

    model, processor = tiny
    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true",
                           "--eval_strategy", "no", "--gradient_checkpointing", "false",
                           "--lora_target_modules", "all-linear", "--lora_dropout", "0", *flags])
    torch.manual_seed(0)  # the same LoRA initialisation in every trainer
    peft_model = prepare_for_training(copy.deepcopy(model), config.model)
    return with_supervised_loss(SFTTrainer)(model=peft_model, args=config.train, data_collator=make_collator(processor),
                                            train_dataset=Dataset.from_list(chart_rows(2)), processing_class=processor)


def test_trainer_loss_equals_with_and_without_full_logits_loss(tiny, tmp_path):
    """Through SFTTrainer (its patched forward) and a LoRA model, as `chartvlm train` runs it."""
    batch = collate_fn(chart_rows(3), tiny[1])
    num_items = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    results = {}
    for full in ("false", "true"):
        trainer = trainer_for(tiny, tmp_path / full, "--full_logits_loss", full)
        trainer.model.train()
        loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True,
                                             num_items_in_batch=num_items)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[full] = loss.detach(), grads, outputs.logits.dim()
    assert results["false"][2] == 2 and results["true"][2] == 3  # (supervised, vocab) vs (batch, length, vocab)
    assert torch.allclose(results["false"][0], results["true"][0], rtol=1e-6, atol=0)
    lora_b = [g for name, g in results["false"][1].items() if "lora_B" in name]  # lora_A's are 0: B starts at 0
    assert len(lora_b) > 10 and all(g.abs().sum() > 0 for g in lora_b)
    assert_same_grads(results["false"][1], results["true"][1])


def test_group_by_length_uses_the_exact_lengths_column(tiny, tmp_path):
    from datasets import Dataset
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from chartvlm.train import sequence_lengths

    rows = chart_rows(8)
    dataset = Dataset.from_list(rows)
    lengths = sequence_lengths(dataset, tiny[1], parse_config([]).data.system_message)
    assert lengths == [int(collate_fn([row], tiny[1])["attention_mask"].sum()) for row in rows]
    dataset = with_lengths(dataset, lengths)
    trainer = trainer_for(tiny, tmp_path, "--train_sampling_strategy", "group_by_length",
                          "--per_device_train_batch_size", "2")
    sampler = trainer._get_train_sampler(dataset)
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
    order = list(sampler)
    assert sorted(order) == list(range(8))
    assert lengths[order[0]] == max(lengths)  # the longest batch first: an out-of-memory shows at once
    assert with_lengths(dataset, [1] * 8)["length"] == [1] * 8  # replaces an existing column


def test_group_by_length_training_runs_end_to_end(tiny_model_dir, chart_dataset_dir, tmp_path):
    from chartvlm.train import main as train_main
    from conftest import run_args

    out = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "run", "--max_steps", "2",
                                           "--train_sampling_strategy", "group_by_length")))
    assert (out / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def shared_charts():
    """Eleven questions about five charts of four sizes (ChartQA asks ~1.5 questions per chart); rows of one
    chart are not adjacent, so the fast path has to find them."""
    from datasets import Dataset, Features, Image, Sequence, Value

    sizes = [(200, 150), (120, 220), (256, 256), (300, 120), (200, 150)]
    charts = [chart_image(*size, (40 * i, 30, 200 - 30 * i), [20 + 15 * i, 50, 80 - 10 * i])
              for i, size in enumerate(sizes)]
    plan = [0, 1, 2, 0, 3, 4, 1, 0, 2, 4, 3]
    rows = [{"image": charts[c], "query": f"What is shown in part {i} of the chart?", "label": [str(i)],
             "human_or_machine": i % 2} for i, c in enumerate(plan)]
    features = Features({"image": Image(), "query": Value("string"), "label": Sequence(Value("string")),
                         "human_or_machine": Value("int64")})
    return Dataset.from_list(rows, features=features), plan


def test_eval_order_groups_each_chart_and_puts_the_longest_first(tiny, shared_charts):
    from chartvlm.evaluate import eval_order

    dataset, plan = shared_charts
    order = eval_order(dataset, list(range(len(plan))), tiny[1])
    assert sorted(order) == list(range(len(plan)))
    charts = [plan[i] for i in order]
    for chart in set(plan):  # each chart's questions side by side, in dataset order
        at = [k for k, c in enumerate(charts) if c == chart]
        assert at == list(range(at[0], at[0] + len(at)))
        assert [order[k] for k in at] == sorted(order[k] for k in at)
    assert charts[0] == 2  # 256x256: the most image tokens
    assert order == eval_order(dataset, list(range(len(plan)))[::-1], tiny[1])  # deterministic
    assert eval_order(dataset, [3, 7, 0], tiny[1]) == [0, 3, 7]  # one chart: dataset order


@pytest.mark.parametrize("batch_size, prefetch", [(3, True), (8, None)])
def test_fast_eval_answers_equal_the_seed_loop(scrambled, shared_charts, tmp_path, batch_size, prefetch):
    from chartvlm.evaluate import EvalSettings, run_predictions
    from chartvlm.generate import text_generator
    from chartvlm.io import read_jsonl
    from chartvlm.prompts import format_data

    model, processor = scrambled
    dataset, plan = shared_charts
    seed = [text_generator(format_data(row), processor, model, "cpu", 6)[0] for row in dataset]
    assert len(set(seed)) > 3  # the answers depend on the chart and question: the comparison is not vacuous

    encoded = []
    handle = model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True)
    settings = EvalSettings(model="m", adapter=None, dataset="d", split="test", subset_seed=0,
                            max_new_tokens=6, batch_size=batch_size)
    try:
        run_predictions(model, processor, dataset, tmp_path, settings, progress=False, prefetch=prefetch)
    finally:
        handle.remove()
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(len(plan)))  # dataset order once complete
    assert [r["prediction"] for r in rows] == seed
    assert sum(encoded) == len(set(plan))  # one vision pass per distinct chart, across batch boundaries too


def test_fast_eval_resumes_without_redoing_or_duplicating(scrambled, shared_charts, tmp_path):
    from chartvlm.evaluate import EvalSettings, run_predictions
    from chartvlm.io import read_jsonl

    model, processor = scrambled
    dataset, plan = shared_charts
    settings = EvalSettings(model="m", adapter=None, dataset="d", split="test", subset_seed=0,
                            max_new_tokens=3, batch_size=4)
    full = run_predictions(model, processor, dataset, tmp_path / "a", settings, progress=False)
    predictions = tmp_path / "a" / "predictions.jsonl"
    kept = [r for r in read_jsonl(predictions) if r["index"] in (1, 5, 6)]  # an interrupted run's rows
    predictions.write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = run_predictions(model, processor, dataset, tmp_path / "a", settings, progress=False)
    assert [r["index"] for r in read_jsonl(predictions)] == list(range(len(plan)))
    assert resumed.throughput["questions"] == len(plan) - 3
    resumed.throughput = full.throughput = None
    assert resumed == full


def test_vision_features_are_shared_only_between_identical_pixels(scrambled):
    from chartvlm.generate import VisionCache, encode_images_once, generation_inputs
    from chartvlm.prompts import build_messages

    model, processor = scrambled
    a = chart_image(200, 150, (200, 30, 30), [10, 50, 90])
    b = a.copy()
    b.putpixel((0, 0), (0, 0, 0))  # one pixel apart
    conversations = [build_messages(image, "q?") for image in (a, b, a.copy())]
    inputs = generation_inputs(conversations, processor)
    with torch.inference_mode():
        reference = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        cache = VisionCache()
        shared = encode_images_once(model, inputs, cache)["mm_encoder_outputs"]["image"].pooler_output
        again = encode_images_once(model, generation_inputs(conversations[2:], processor), cache)
    assert shared[0] is shared[2] and shared[0] is not shared[1]
    for got, expected in zip(shared, reference):
        assert torch.allclose(got, expected, atol=1e-5)
    assert again["mm_encoder_outputs"]["image"].pooler_output[0] is shared[0]  # from the cache
    assert "pixel_values" not in again
