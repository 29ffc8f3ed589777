"""Every behaviour of the pipeline, for every Qwen family's tiny preset (and, where the real vocabulary is
available offline, with it): labels, image tokens, sequence lengths, the answer-only head, batched generation,
what trains, resume, export. Plus the family table's published facts (templates, shape presets)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from chartvlm.collate import IGNORE_INDEX, collate_fn
from chartvlm.config import parse_config
from chartvlm.families import FAMILIES
from chartvlm.generate import generate_answers
from chartvlm.modelinit import PRESETS, TINY_PRESETS, build_config, build_tokenizer_for, published_config
from chartvlm.prompts import format_data
from conftest import (ALL_KINDS, FAMILY_KINDS, TEST_MAX_PIXELS, TEST_MIN_PIXELS, chart_image, chart_rows, kind_id,
                      run_args, tiny_of)

FAMILY_IDS = [kind[0] for kind in FAMILY_KINDS]


def family_rows(n: int, answers: list[str] | None = None) -> list[dict]:
    rows = chart_rows(n)
    for row, answer in zip(rows, answers or []):
        row["label"] = [answer]
    return rows


# ------------------------------------------------------------------ published facts

TEMPLATE_SHA256 = {  # templates/SOURCES.md: hashes of the official files, published by third parties
    "qwen2_vl": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "qwen3_vl": "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",
    "qwen3_5_nothink": "273d8e0e683b885071fb17e08d71e5f2a5ddfb5309756181681de4f5a1822d80",
    "qwen3_5_think": "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
}


@pytest.mark.parametrize("template", sorted(TEMPLATE_SHA256))
def test_chat_templates_are_the_published_ones_byte_for_byte(template):
    text = FAMILIES["qwen2_vl"].chat_template(template)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == TEMPLATE_SHA256[template]


# Key numbers of each shape preset, read from the checkpoints' configs (presets/SOURCES.md names each source):
# text hidden, layers, heads, kv heads, vocabulary; vision depth, width, patch; image token id.
PUBLISHED = {
    "qwen2-vl-2b": (1536, 28, 12, 2, 151936, 32, 1280, 14, 151655),
    "qwen2.5-vl-3b": (2048, 36, 16, 2, 151936, 32, 1280, 14, 151655),
    "qwen2.5-vl-7b": (3584, 28, 28, 4, 152064, 32, 1280, 14, 151655),
    "qwen3-vl-2b": (2048, 28, 16, 8, 151936, 24, 1024, 16, 151655),
    "qwen3-vl-4b": (2560, 36, 32, 8, 151936, 24, 1024, 16, 151655),
    "qwen3-vl-8b": (4096, 36, 32, 8, 151936, 27, 1152, 16, 151655),
    "qwen3-vl-30b-a3b": (2048, 48, 32, 4, 151936, 27, 1152, 16, 151655),
    "qwen3.5-0.8b": (1024, 24, 8, 2, 248320, 12, 768, 16, 248056),
    "qwen3.5-4b": (2560, 32, 16, 4, 248320, 24, 1024, 16, 248056),
    "qwen3.5-9b": (4096, 32, 16, 4, 248320, 27, 1152, 16, 248056),
}


def _flat(published: dict) -> tuple[dict, dict]:
    """(text fields, vision fields) of a config.json: v4 files (Qwen2/2.5-VL) are flat, newer ones nested."""
    text = published.get("text_config") or {k: v for k, v in published.items() if k != "vision_config"}
    return text, published["vision_config"]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_shape_presets_equal_the_published_configs_field_by_field(preset):
    tokenizer = build_tokenizer_for(preset)
    config = build_config(preset, tokenizer)
    text, vision = _flat(published_config(preset))
    renamed = {"in_chans": "in_channels"}
    skipped = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "rope_scaling",
               "rope_theta", "rope_parameters", "spatial_patch_size", "vision_config", "text_config", "use_cache",
               "tie_word_embeddings", "vision_token_id", "image_token_id", "video_token_id", "vision_start_token_id",
               "vision_end_token_id", "partial_rotary_factor",
               "sliding_window"}  # transformers 5 sets it to None when use_sliding_window is false, as published
    for key, value in text.items():
        if key not in skipped:
            assert getattr(config.text_config, key) == value, f"text_config.{key}"
    for key, value in vision.items():
        if key not in skipped:
            assert getattr(config.vision_config, renamed.get(key, key)) == value, f"vision_config.{key}"
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    assert config.text_config.rope_parameters["mrope_section"] == rope["mrope_section"]
    theta = text.get("rope_theta") or rope.get("rope_theta")
    assert config.text_config.rope_parameters["rope_theta"] == theta
    hidden, layers, heads, kv, vocab, depth, width, patch, image_id = PUBLISHED[preset]
    tc, vc = config.text_config, config.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size) == \
        (hidden, layers, heads, kv, vocab)
    assert (vc.depth, getattr(vc, "embed_dim", None) or vc.hidden_size, vc.patch_size) == (depth, width, patch)
    assert config.image_token_id == image_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_every_family_has_a_tiny_preset_and_a_template():
    assert set(TINY_PRESETS) == set(FAMILIES)
    for family in FAMILIES.values():
        assert family.chat_template().startswith("{")
        assert PRESETS[TINY_PRESETS[family.model_type]].family == family.model_type


# ------------------------------------------------------------------ labels, image tokens, lengths

TRICKY_ANSWERS = ["42", " 6.8", "1,625,942", "62%", "\nYes", "No\n", "Côte d'Ivoire", "数据 2014", "🚀 rocket",
                  "  two  spaces ", "\n\nline\nbreaks\n"]


@pytest.mark.parametrize("kind", ALL_KINDS, ids=kind_id)
def test_labels_decode_to_exactly_each_answer_and_the_end_token(kind):
    _, processor = tiny_of(*kind)
    rows = family_rows(len(TRICKY_ANSWERS), TRICKY_ANSWERS)
    batch = collate_fn(rows, processor)
    tokenizer = processor.tokenizer
    trims = "qwen3_5" in kind[0]  # Qwen3.5's template strips message text
    for ids, labels, answer in zip(batch["input_ids"], batch["labels"], TRICKY_ANSWERS):
        kept = labels[labels != IGNORE_INDEX]
        assert torch.equal(kept, ids[labels != IGNORE_INDEX])
        assert (labels != IGNORE_INDEX).sum() >= 2, "an answer and its end token are supervised"
        assert tokenizer.decode(kept) == (answer.strip() if trims else answer) + "<|im_end|>"


@pytest.mark.parametrize("kind", ALL_KINDS, ids=kind_id)
def test_image_tokens_match_the_grid_and_header_lengths_match_the_batch(kind):
    from chartvlm.train import sequence_length

    model, processor = tiny_of(*kind)
    rows = family_rows(4)
    batch = collate_fn(rows, processor)
    merge = model.config.vision_config.spatial_merge_size
    counts = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert counts.tolist() == (batch["image_grid_thw"].prod(dim=1) // merge ** 2).tolist()
    measure = sequence_length(processor, parse_config([]).data.system_message)
    lengths = [measure(row, *row["image"].size) for row in rows]
    assert lengths == batch["attention_mask"].sum(dim=1).tolist()


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_answer_only_head_gives_the_full_logits_loss_and_gradients(family):
    from chartvlm.train import supervised_loss

    model, processor = tiny_of(family)
    model = copy.deepcopy(model).train()
    batch = collate_fn(family_rows(3), processor)
    grads = {}
    for full in (True, False):
        model.zero_grad()
        loss, _ = supervised_loss(model, dict(batch), full_logits=full)
        loss.backward()
        grads[full] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-6)
    assert grads[True][1].keys() == grads[False][1].keys() and len(grads[True][1]) > 10
    for name, grad in grads[True][1].items():
        torch.testing.assert_close(grads[False][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("kind", ALL_KINDS, ids=kind_id)
def test_batched_left_padded_generation_equals_one_at_a_time(kind):
    model, processor = tiny_of(*kind, scrambled=True)
    rows = family_rows(4)
    rows[3]["image"] = rows[0]["image"]  # one chart asked twice: share_vision has something to share
    assert len({row["image"].size for row in rows}) >= 2
    conversations = [format_data(row) for row in rows]
    single = [generate_answers(model, processor, [c], max_new_tokens=6)[0] for c in conversations]
    assert len(set(single)) > 1 and all(single), f"outputs must vary, or the test proves nothing: {single}"
    for share_vision in (False, True):
        assert generate_answers(model, processor, conversations, max_new_tokens=6, share_vision=share_vision) == single


# ------------------------------------------------------------------ what trains


def one_step(model, processor, model_args):
    from chartvlm.modeling import prepare_for_training
    from chartvlm.train import supervised_loss

    model = prepare_for_training(copy.deepcopy(model), model_args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss, _ = supervised_loss(model, dict(collate_fn(family_rows(2), processor)))
    loss.backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_lora_trains_only_lora_and_full_tuning_keeps_the_vision_tower_frozen(family):
    model, processor = tiny_of(family)
    lora = one_step(model, processor, parse_config(["--lora_target_modules", "auto"]).model)
    assert lora and all("lora_" in name for name in lora)
    assert not any(".visual." in name for name in lora), "LoRA stays on the language model"
    full = one_step(model, processor, parse_config(["--tuning", "full"]).model)
    assert any("language_model" in name for name in full)
    assert not any(".visual." in name for name in full), "the vision tower is frozen by default"
    projector = one_step(model, processor, parse_config(["--tuning", "full", "--train_projector", "true"]).model)
    tower = FAMILIES[family]
    assert {n for n in projector if ".visual." in n} == {
        n for n in projector if ".visual." in n and any(f".{p}." in n for p in tower.projectors)} != set()


# ------------------------------------------------------------------ the commands, end to end


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Each family's tiny preset on disk, and a small dataset."""
    from datasets import Dataset, DatasetDict

    from chartvlm.modelinit import init_model

    root = tmp_path_factory.mktemp("families")
    rows = chart_rows(8)
    DatasetDict({"train": Dataset.from_list(rows[:6]), "test": Dataset.from_list(rows[6:])}).save_to_disk(
        str(root / "data"))
    models = {family: init_model(TINY_PRESETS[family], root / family, min_pixels=TEST_MIN_PIXELS,
                                 max_pixels=TEST_MAX_PIXELS) for family in FAMILY_IDS}
    return root, models


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_train_eval_predict_export_run_for_every_family(family, family_dirs, tmp_path):
    from chartvlm.evaluate import run_eval
    from chartvlm.modeling import load_model, load_processor
    from chartvlm.predict import export_merged, predict
    from chartvlm.train import main as train_main

    root, models = family_dirs
    common = ["--eval_strategy", "no", "--test_split", "test", "--eval_max_new_tokens", "3", "--report", "false",
              "--lora_target_modules", "auto"]
    adapter = train_main(parse_config(run_args(models[family], root / "data", tmp_path / "lora", "--max_steps", "2",
                                               *common)))
    result = run_eval(parse_config(run_args(models[family], root / "data", tmp_path / "lora", "--adapter",
                                            str(adapter), *common)), progress=False)["model"]
    assert result.overall["total"] == 2
    chart_image(120, 90, (200, 30, 30), [10, 40]).save(tmp_path / "c.png")
    assert len(predict(str(models[family]), [str(tmp_path / "c.png")], ["Q?"], adapter=str(adapter),
                       max_new_tokens=2)) == 1
    merged = export_merged(str(adapter), str(tmp_path / "merged"))
    processor = load_processor(str(merged))
    batch = collate_fn(chart_rows(2), processor)
    batch.pop("labels")
    with torch.no_grad():
        merged_logits = load_model(str(merged), device=torch.device("cpu"))(**batch).logits
        adapter_logits = load_model(str(models[family]), adapter=str(adapter), device=torch.device("cpu"))(**batch).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_full_tuning_resume_ends_where_an_uninterrupted_run_does(family, family_dirs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from chartvlm.train import main as train_main
    from test_reliability import interrupted_then_resumed

    root, models = family_dirs
    args = lambda out: run_args(models[family], root / "data", out, "--tuning", "full", "--max_steps", "5",  # noqa: E731
                                "--save_strategy", "steps", "--save_steps", "100", "--eval_strategy", "no")
    straight = train_main(parse_config(args(tmp_path / "straight")))
    interrupted_then_resumed(args(tmp_path / "resumed"), monkeypatch)
    expected, got = load_file(str(straight / "model.safetensors")), load_file(str(tmp_path / "resumed" /
                                                                                  "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ masking that does not depend on one template


def test_a_template_that_changes_earlier_turns_is_an_error_naming_the_model():
    from chartvlm.errors import ChartVLMError
    from chartvlm.prompts import prompt_and_completion

    _, processor = tiny_of("qwen2_5_vl")
    processor = copy.deepcopy(processor)
    # A template that writes the question differently once an answer follows it.
    processor.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ 'ANSWERED ' if messages|length"
                               " > 2 else '' }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                               "assistant\n{% endif %}")
    processor.tokenizer.name_or_path = "some/odd-model"
    with pytest.raises(ChartVLMError, match="chat template of some/odd-model"):
        prompt_and_completion(processor, format_data(chart_rows(1)[0]), "some/odd-model")


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_supervises_the_answer_after_the_empty_think_block(family):
    """Qwen3.5's generation prompt (enable_thinking=False) ends with <think>\\n\\n</think>\\n\\n: the model must
    then generate the answer alone, which is exactly what is supervised."""
    from chartvlm.prompts import prompt_and_completion

    _, processor = tiny_of(family)
    prompt, completion = prompt_and_completion(processor, format_data(chart_rows(1)[0]))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert completion == "10<|im_end|>\n"
