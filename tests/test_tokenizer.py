"""The real Qwen vocabulary offline (PyPI dashscope's qwen.tiktoken) and our small BPE: released ids, parity with
the reference BPE (tiktoken), and answers found from the rendered prompt rather than from a token pattern."""

from __future__ import annotations

import base64
import unicodedata

import pytest

from chartvlm.collate import IGNORE_INDEX, collate_fn
from chartvlm.errors import BadSampleError
from chartvlm.families import FAMILIES
from chartvlm.tokenizer import build_qwen_tokenizer, qwen_vocabulary_file
from conftest import chart_rows, tiny_of

tiktoken = pytest.importorskip("tiktoken", reason="tiktoken comes with dashscope (the test extra)")


@pytest.fixture(scope="module")
def qwen():
    return build_qwen_tokenizer(FAMILIES["qwen2_5_vl"])


@pytest.fixture(scope="module")
def reference():
    """Qwen-1's own tokenizer: tiktoken over the same rank file, Qwen's pattern, the control tokens."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ranks = {}
    for line in qwen_vocabulary_file().read_bytes().splitlines():
        piece, rank = line.split()
        ranks[base64.b64decode(piece)] = int(rank)
    specials = {token.content: token.id for token in FAMILIES["qwen2_5_vl"].tokens}
    return tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens=specials)


def test_the_real_vocabulary_gives_the_released_ids(qwen):
    assert qwen("Hello world")["input_ids"] == [9707, 1879]
    assert qwen("<|im_start|>assistant\n")["input_ids"] == [151644, 77091, 198]
    assert len(qwen) == 151665
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|file_sep|>"]) == \
        [151643, 151645, 151655, 151664]
    assert (qwen.eos_token, qwen.pad_token) == ("<|im_end|>", "<|endoftext|>")
    qwen3 = build_qwen_tokenizer(FAMILIES["qwen3_vl"])
    assert qwen3.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668] and len(qwen3) == 151669


TEXTS = [
    "What is the value of Apple in 2014?", "Yes", "No\n", "1,625,942", "6.8%", "  leading and trailing  ",
    "\n\nline\nbreaks\r\n", "Côte d'Ivoire", "数据 2014 年", "🚀 rocket 👍🏽", "naïve café résumé", "e\u0301",
    "I'm here, they're there, we'd go", "x = [1, 2, 3]  # code\tand\ttabs", "   \n  \n", "'s 'S 'RE",
    "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n", "multiple     spaces", "$42.00 (USD)",
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_converted_vocabulary_tokenizes_exactly_as_the_reference_bpe(qwen, reference, text):
    expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert qwen(text, add_special_tokens=False)["input_ids"] == expected
    assert qwen.decode(expected) == unicodedata.normalize("NFC", text)


def test_an_answer_that_begins_with_a_line_break_is_trained(qwen, reference):
    """With the real vocabulary the assistant header's \\n and an answer's leading \\n merge into one token
    (\\n\\n), so a search for the `<|im_start|>assistant\\n` tokens finds nothing and such a sample was silently
    not trained. The completion is tokenized after the prompt, as the model generates it."""
    assert reference.encode("assistant\n\nYes") == [77091, 271, 9454]  # the merge the old search tripped on
    _, processor = tiny_of("qwen2_5_vl", "qwen")
    rows = chart_rows(2)
    rows[0]["label"], rows[1]["label"] = ["\nYes"], ["\n\n42"]
    batch = collate_fn(rows, processor)
    for ids, labels, answer in zip(batch["input_ids"], batch["labels"], ["\nYes", "\n\n42"]):
        supervised = labels != IGNORE_INDEX
        assert supervised.sum() >= 2
        assert processor.tokenizer.decode(ids[supervised]) == answer + "<|im_end|>"
        first = int(supervised.nonzero()[0])
        assert ids[first - 2 : first].tolist() == [77091, 198], "the prompt ends as the generation prompt does"


def test_an_answer_without_the_end_token_is_an_error_naming_the_row():
    import copy

    _, processor = tiny_of("qwen2_5_vl")
    processor = copy.deepcopy(processor)
    processor.chat_template = processor.chat_template.replace("<|im_end|>", "<|endoftext|>")
    rows = chart_rows(1)
    rows[0]["row_id"] = "test-7"
    with pytest.raises(BadSampleError, match=r"row test-7.*no <\|im_end\|>"):
        collate_fn(rows, processor)


def test_qwen35_has_no_offline_vocabulary():
    from chartvlm.errors import ChartVLMError

    with pytest.raises(ChartVLMError, match="Qwen3.5 has its own vocabulary"):
        build_qwen_tokenizer(FAMILIES["qwen3_5"])


def test_model_init_with_the_real_vocabulary_writes_a_loadable_model(tmp_path):
    from transformers import AutoProcessor

    from chartvlm.cli import main

    assert main(["model", "init", "--preset", "tiny", "--tokenizer", "qwen", "--out", str(tmp_path / "m")]) == 0
    processor = AutoProcessor.from_pretrained(str(tmp_path / "m"))
    assert processor.tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
