"""The collator supervises exactly each answer + <|im_end|>, and keeps every processor key."""

import re
from pathlib import Path

import torch

from chartvlm.collate import IGNORE_INDEX, collate_fn
from chartvlm.prompts import SYSTEM_MESSAGE, format_data
from conftest import chart_rows


def supervised_texts(batch, tokenizer):
    texts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != IGNORE_INDEX]
        # labels are a copy of input_ids where kept, never anything else
        assert torch.equal(kept, ids[labels != IGNORE_INDEX])
        texts.append(tokenizer.decode(kept))
    return texts


def test_labels_decode_to_exactly_each_answer_and_im_end(tiny):
    _, processor = tiny
    rows = chart_rows(6)
    batch = collate_fn(rows, processor)
    expected = [row["label"][0] + "<|im_end|>" for row in rows]
    assert supervised_texts(batch, processor.tokenizer) == expected


def test_formatted_samples_and_raw_rows_give_the_same_batch(tiny):
    _, processor = tiny
    rows = chart_rows(4)
    from_rows = collate_fn(rows, processor)
    from_messages = collate_fn([format_data(r) for r in rows], processor)
    assert from_rows.keys() == from_messages.keys()
    for key in from_rows:
        assert torch.equal(from_rows[key], from_messages[key]), key


def test_prompt_vision_and_padding_are_masked(tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    batch = collate_fn(chart_rows(4), processor)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (labels[ids == image_pad] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (mask == 0).any(), "rows of different lengths must have produced padding"
    # Everything before the answer (system prompt, question) is masked: the first supervised
    # position directly follows "<|im_start|>assistant\n".
    opener = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        first = next(i for i, v in enumerate(row_labels) if v != IGNORE_INDEX)
        assert row_ids[first - len(opener) : first] == opener
    system_ids = tokenizer.encode(SYSTEM_MESSAGE, add_special_tokens=False)
    assert (labels != IGNORE_INDEX).sum() < len(system_ids)


def test_every_processor_key_is_kept(tiny):
    model, processor = tiny
    rows = chart_rows(2)
    texts = [processor.apply_chat_template(format_data(r), tokenize=False) for r in rows]
    reference = processor(text=texts, images=[r["image"] for r in rows], padding=True, return_tensors="pt")
    batch = collate_fn(rows, processor)
    assert set(reference) | {"labels"} == set(batch)
    assert "mm_token_type_ids" in batch
    # The key matters: without it Qwen2.5-VL silently falls back to 1-D positions.
    with torch.no_grad():
        full = model(**batch).logits
        dropped = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits
    assert not torch.allclose(full, dropped)


def test_no_literal_special_token_ids_in_the_package():
    """Every stage asks the tokenizer for ids; only the family table knows the released ones (to build
    tokenizers with them and to check them)."""
    source = Path(__file__).parents[1] / "src" / "chartvlm"
    offenders = [p.name for p in source.glob("*.py")
                 if p.name != "families.py" and re.search(r"\b(1516[4-6]\d|2480[4-5]\d)\b", p.read_text())]
    assert offenders == []
