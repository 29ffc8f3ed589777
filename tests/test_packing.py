"""Padding-free packed training is exact: the same loss and gradients as padded batches, each sample's own
M-RoPE positions, no attention or state crossing samples, and runs that resume to the uninterrupted weights."""

from __future__ import annotations

import copy

import pytest
import torch

from chartvlm import packing
from chartvlm.collate import IGNORE_INDEX, collate_fn
from chartvlm.config import parse_config
from chartvlm.errors import ChartVLMError
from chartvlm.families import FAMILIES
from chartvlm.train import supervised_loss
from conftest import FAMILY_KINDS, chart_image, chart_rows, run_args, tiny_of

PACKABLE = [family for family, _ in FAMILY_KINDS if not FAMILIES[family].linear_attention]


def test_bins_hold_every_sample_once_within_the_budget():
    lengths = [300, 120, 500, 80, 250, 400, 60, 90]
    bins = packing.first_fit_decreasing(lengths, 512)
    assert sorted(i for found in bins for i in found) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in found) <= 512 for found in bins)
    assert len(bins) == 4 and bins == packing.first_fit_decreasing(lengths, 512)  # deterministic
    with pytest.raises(ChartVLMError, match="sample 2 has 500 tokens, more than max_length=400"):
        packing.first_fit_decreasing(lengths, 400)


def packed_model(family: str):
    model, processor = tiny_of(family)
    model = copy.deepcopy(model)
    packing.prepare_model(model, FAMILIES[family], "sdpa")
    return model, processor


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_loss_and_gradients_equal_the_padded_batch(family):
    model, processor = packed_model(family)
    batch = collate_fn(chart_rows(4), processor)
    packed = packing.pack_batch(dict(batch), packing.rope_index_of(model))
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    results = []
    for inputs in (batch, packed):
        model.zero_grad()
        loss, _ = supervised_loss(model.train(), dict(inputs))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", PACKABLE)
def test_each_sample_keeps_its_own_positions(family):
    model, processor = packed_model(family)
    rows = chart_rows(3)
    packed = packing.pack_batch(dict(collate_fn(rows, processor)), packing.rope_index_of(model))
    expected_text, expected_rope = [], []
    for row in rows:
        single = collate_fn([row], processor)
        rope, _ = model.model.get_rope_index(input_ids=single["input_ids"], mm_token_type_ids=single["mm_token_type_ids"],
                                            image_grid_thw=single["image_grid_thw"],
                                            attention_mask=single["attention_mask"])
        expected_rope.append(rope[:, 0])
        expected_text.append(torch.arange(single["input_ids"].shape[1]))
    assert torch.equal(packed["position_ids"][0, 0], torch.cat(expected_text))
    assert torch.equal(packed["position_ids"][1:, 0], torch.cat(expected_rope, dim=1))


@pytest.mark.parametrize("family", PACKABLE)
def test_no_sample_sees_another(family):
    """Another chart and another answer in one sample of the row leave every other sample's logits as they were."""
    model, processor = packed_model(family)
    rows = chart_rows(4)
    changed = copy.deepcopy(rows)
    changed[1]["image"] = chart_image(200, 150, (0, 0, 0), [80, 10, 60])
    changed[1]["label"] = ["a much longer answer"]
    logits, spans = [], []
    for version in (rows, changed):
        batch = collate_fn(version, processor)
        packed = packing.pack_batch(dict(batch), packing.rope_index_of(model))
        with torch.no_grad():
            output = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False)
        bounds = packed["cu_seq_lens_q"].tolist()
        logits.append(output.logits[0])
        spans.append(list(zip(bounds[:-1], bounds[1:])))
    for sample in (0, 2, 3):
        (a0, a1), (b0, b1) = spans[0][sample], spans[1][sample]
        torch.testing.assert_close(logits[1][b0:b1], logits[0][a0:a1], rtol=1e-5, atol=1e-5)
    (a0, a1), (b0, b1) = spans[0][1], spans[1][1]
    assert a1 - a0 != b1 - b0 or not torch.allclose(logits[0][a0:a1], logits[1][b0:b1])


def test_packed_attention_runs_one_sample_at_a_time(monkeypatch):
    model, processor = packed_model("qwen2_5_vl")
    calls = []
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    packed = packing.pack_batch(dict(collate_fn(chart_rows(3), processor)), packing.rope_index_of(model))
    with torch.no_grad():
        model.model.language_model(inputs_embeds=torch.randn(1, packed["input_ids"].shape[1], 64),
                                   position_ids=packed["position_ids"], use_cache=False,
                                   cu_seq_lens_q=packed["cu_seq_lens_q"], cu_seq_lens_k=packed["cu_seq_lens_k"])
    lengths = torch.diff(packed["cu_seq_lens_q"]).tolist()
    assert calls == lengths * model.config.text_config.num_hidden_layers, "no attention call spans the whole row"


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_linear_attention_families_refuse_packing_without_their_kernels(family):
    model, _ = tiny_of(family)
    with pytest.raises(ChartVLMError, match="flash-linear-attention and causal-conv1d"):
        packing.prepare_model(copy.deepcopy(model), FAMILIES[family], "sdpa")


def test_a_packed_run_learns_what_the_padded_run_learns(tiny_model_dir, chart_dataset_dir, tmp_path):
    """Every sample in one step (one bin; one batch), plain SGD: packed and padded training end with the same
    weights; with gradient accumulation over two steps as well."""
    from safetensors.torch import load_file

    from chartvlm.train import main as train_main

    common = ["--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5", "--lora_dropout", "0",
              "--max_length", "4096", "--per_device_train_batch_size", "10"]
    adapters = {}
    for name, extra in (("padded", []), ("packed", ["--packing", "true", "--per_device_train_batch_size", "1"])):
        out = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / name, *common, *extra)))
        adapters[name] = load_file(str(out / "adapter_model.safetensors"))
    assert adapters["padded"].keys() == adapters["packed"].keys()
    for key, value in adapters["padded"].items():
        torch.testing.assert_close(adapters["packed"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    accumulated = train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, tmp_path / "accumulated",
                                                   *common, "--packing", "true", "--max_length", "1300",
                                                   "--per_device_train_batch_size", "1",
                                                   "--gradient_accumulation_steps", "4")))
    assert (accumulated / "adapter_model.safetensors").is_file()
