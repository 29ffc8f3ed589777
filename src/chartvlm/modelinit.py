"""Build randomly initialised Qwen2.5-VL models, tokenizers and processors offline.

Nothing can be downloaded from the Hugging Face Hub on our machines, so tests, CPU benchmarks and
speed measurements use a model built in-process: a small byte-level BPE trained on a built-in chart
QA corpus, Qwen's special tokens in Qwen's order, our own copy of Qwen2.5-VL's chat format, the stock
Qwen2.5-VL processor classes and a random-weight `Qwen2_5_VLForConditionalGeneration`.

Presets: "tiny" (test suite), "small" (CPU benchmark), "qwen2.5-vl-3b" / "qwen2.5-vl-7b" (the real
architectures, random weights, for speed and memory measurements only).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chartvlm.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from chartvlm.errors import ChartVLMError
from chartvlm.io import make_readable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

logger = logging.getLogger(__name__)

# Qwen2.5-VL's special tokens, in the order (and so the relative ids) of the real tokenizer.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."


# Real Qwen vocabulary size (embedding rows of the 3B checkpoint); full-size presets pad to it so
# that embedding / LM-head cost matches the real model even though our BPE is much smaller.
QWEN_3B_VOCAB_SIZE = 151_936
QWEN_7B_VOCAB_SIZE = 152_064

# Produces exactly Qwen2.5-VL's prompt format. `content` is a plain string or a list of
# {"type": "image"} / {"type": "text", "text": ...} items; a missing system turn gets the default.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render(messages[0]['content']) + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The vision tower shared by the released 3B and 7B checkpoints (their config.json).
QWEN25_VL_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "num_heads": 16,
    "intermediate_size": 3420,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}

# Architecture presets. Vision `out_hidden_size` always equals text `hidden_size`, and
# `mrope_section` sums to head_dim / 2 (head_dim = hidden_size / num_attention_heads).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer_vocab_size": 2048,
        "model_vocab_size": None,  # None: exactly the tokenizer's size
        "tie_word_embeddings": True,
        "text": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "mrope_section": [2, 3, 3],
        },
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 4,
            "intermediate_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
    },
    "small": {
        "tokenizer_vocab_size": 4096,
        "model_vocab_size": None,
        "tie_word_embeddings": True,
        "text": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 688,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "mrope_section": [4, 6, 6],
        },
        "vision": {
            "depth": 4,
            "hidden_size": 128,
            "num_heads": 4,
            "intermediate_size": 256,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
        },
    },
    # Qwen/Qwen2.5-VL-3B-Instruct config.json.
    "qwen2.5-vl-3b": {
        "tokenizer_vocab_size": 4096,
        "model_vocab_size": QWEN_3B_VOCAB_SIZE,
        "tie_word_embeddings": True,
        "text": {
            "hidden_size": 2048,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "intermediate_size": 11008,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "mrope_section": [16, 24, 24],
        },
        "vision": QWEN25_VL_VISION,
    },
    # Qwen/Qwen2.5-VL-7B-Instruct config.json.
    "qwen2.5-vl-7b": {
        "tokenizer_vocab_size": 4096,
        "model_vocab_size": QWEN_7B_VOCAB_SIZE,
        "tie_word_embeddings": False,
        "text": {
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "intermediate_size": 18944,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "mrope_section": [16, 24, 24],
        },
        "vision": QWEN25_VL_VISION,
    },
}


# --------------------------------------------------------------------------------------------
# Built-in tokenizer corpus
# --------------------------------------------------------------------------------------------

_QUESTION_TEMPLATES = """\
What is the value of {e} in {y}?
What was the {m} of {e} in {y}?
Which {c} has the highest {m}?
Which {c} has the lowest {m}?
What is the difference between {e} and {f}?
What is the sum of {e} and {f}?
What is the average {m} of {e}?
How many {c} are shown in the chart?
How many bars have a value greater than {n}?
Is the {m} of {e} greater than that of {f}?
Does {e} have a higher {m} than {f}?
In which year did {e} reach its peak?
In which year was the {m} of {e} the lowest?
What percentage of respondents said {e}?
What's the share of {e} in {y}?
What color represents {e}?
Which color is used for {e} in the legend?
What is the ratio of {e} to {f}?
Is the sum of {e} and {f} more than {n}?
What is the median value of the {m}?
When did {e} record the most {m}?
Who had the largest {m} in {y}?
How much did the {m} of {e} increase from {y} to {z}?
By how much did the {m} of {e} decrease between {y} and {z}?
What is the total {m} of all {c}?
Does the line for {e} ever go above {n}?
Which two {c} have the same {m}?
What is the maximum {m} in the chart?
What is the minimum {m} shown?
Is the trend of {e} increasing or decreasing?
"""

_CHART_WORDS = """\
chart bar bars line lines pie pies slice slices axis x-axis y-axis legend label labels title value
values percentage percent share revenue sales population GDP growth rate million billion thousand
trillion dollars euros pounds yen units number count total sum average mean median maximum minimum
highest lowest largest smallest greater smaller less more than difference ratio increase decrease
trend year years month months quarter quarters week day days period annual monthly quarterly daily
respondents survey poll opinion favorable unfavorable approve disapprove agree disagree support
oppose country countries company companies brand brands category categories group groups segment
market consumers users customers employees households adults children men women age ages income
price prices cost costs profit loss export exports import imports production consumption emissions
energy oil gas coal electricity unemployment inflation debt budget spending investment tourism
visitors students schools hospitals cases deaths births vaccinated infected recovered tested
stacked grouped horizontal vertical scatter area histogram plot graph figure source statistic data
color colour blue red green orange yellow purple grey gray black white pink brown light dark navy
teal cyan magenta olive maroon represented representing shown shows displayed indicates
compared comparison between across among during from over under above below between each every
which what who when where how many much does did is are was were has have had the of in on for to
and or a an by with at as that this these those its their it than same different all both either
neither not no yes Yes No True False none other others rest remaining unknown don't know refused
first second third fourth fifth last next previous before after since until per cent respectively
answer question single word number phrase short analyst expert Vision Language Model specialized
interpreting visual data chart images Your task analyze provide concise answers based image focus
delivering accurate succinct answers minimal explanation Answer using
"""

_ENTITIES = """\
United States|China|India|Japan|Germany|United Kingdom|France|Italy|Canada|Brazil|Russia|South Korea|
Australia|Spain|Mexico|Indonesia|Netherlands|Saudi Arabia|Turkey|Switzerland|Poland|Sweden|Belgium|
Argentina|Norway|Austria|Ireland|Israel|Nigeria|South Africa|Egypt|Denmark|Singapore|Malaysia|
Philippines|Vietnam|Bangladesh|Pakistan|Chile|Colombia|Finland|Portugal|Greece|New Zealand|Peru|
Czech Republic|Romania|Hungary|Ukraine|Kenya|Morocco|Thailand|Iran|Iraq|Qatar|Kuwait|Ethiopia|
Europe|Asia|Africa|North America|Latin America|Middle East|Oceania|World|Other|Others|Total|
Apple|Samsung|Microsoft|Google|Amazon|Facebook|Meta|Tesla|Toyota|Volkswagen|Walmart|Netflix|Sony|
Huawei|Xiaomi|Alibaba|Tencent|Intel|IBM|Oracle|Nike|Adidas|Coca-Cola|PepsiCo|McDonald's|Starbucks|
Disney|Spotify|Uber|Airbnb|Twitter|YouTube|Instagram|TikTok|WhatsApp|Snapchat|LinkedIn|Pinterest|
Democrats|Republicans|Independents|Liberal|Conservative|Moderate|Very good|Somewhat good|Bad|
January|February|March|April|May|June|July|August|September|October|November|December|
Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Oct|Nov|Dec|Q1|Q2|Q3|Q4|Monday|Friday|Sunday|
Agriculture|Industry|Services|Manufacturing|Construction|Retail|Healthcare|Education|Finance|
Transportation|Technology|Entertainment|Mining|Real estate|Hospitality|Government|Nonprofit|
California|Texas|Florida|New York|Illinois|Pennsylvania|Ohio|Georgia|Michigan|Washington|Arizona|
Massachusetts|Virginia|Colorado|Oregon|Nevada|Alabama|Kentucky|Louisiana|Minnesota|Wisconsin|
London|Paris|Berlin|Tokyo|Beijing|Shanghai|Mumbai|Delhi|Moscow|Madrid|Rome|Toronto|Sydney|Dubai|
Chicago|Los Angeles|San Francisco|Boston|Seattle|Houston|Miami|Atlanta|Hong Kong|Seoul|Istanbul|
Manchester United|Real Madrid|Barcelona|Bayern Munich|Liverpool|Chelsea|Arsenal|Juventus|Lakers|
Yankees|Cowboys|Patriots|Warriors|Ferrari|Mercedes|Red Bull|Honda|Nissan|Hyundai|Ford|BMW|Audi|
Chevrolet|Renault|Peugeot|Volvo|Boeing|Airbus|Siemens|Philips|Nestle|Unilever|Procter & Gamble|
Johnson & Johnson|Pfizer|Moderna|AstraZeneca|Novartis|Roche|Bayer|Shell|ExxonMobil|Chevron|BP|
TotalEnergies|Gazprom|Aramco|Visa|Mastercard|PayPal|JPMorgan|Goldman Sachs|HSBC|Barclays|Citi|
Verizon|AT&T|Vodafone|Nokia|Ericsson|Lenovo|Dell|HP|Asus|Acer|Nintendo|PlayStation|Xbox|Steam|
Android|iOS|Windows|Linux|Chrome|Safari|Firefox|Edge|Opera|Bing|Baidu|Yahoo|Reddit|Wikipedia
"""

# General English, so the BPE learns ordinary sub-words and not only chart names.
_GENERAL_WORDS = """\
about according account across action activity actually address administration affect afford
against agency agreement ahead allow almost alone along already although always amount analysis
animal another anyone anything appear apply approach area argue arm around arrive article artist
ask assume attack attention attorney audience author authority available avoid away baby back
ball bank base beat beautiful because become bed begin behavior behind believe benefit best better
beyond big bill billion bit blood board body book born break bring brother build building business
buy call camera campaign cancer candidate capital car card care career carry catch cause cell center
central century certain certainly chair challenge chance change character charge check child choice
choose church citizen city civil claim class clear clearly close coach cold collection college
commercial common community compare computer concern condition conference Congress consider consumer
contain continue control cost could couple course court cover create crime cultural culture cup
current customer dark daughter dead deal death debate decade decide decision deep defense degree
democratic describe design despite detail determine develop development die diet difference
difficult dinner direction director discover discuss disease doctor dog door down draw dream drive
drop drug during early east easy economic economy edge effect effort eight either election else
employee end energy enjoy enough enter entire environment environmental especially establish even
evening event ever evidence exactly example executive exist expect experience explain eye face fact
factor fail fall family far fast father fear federal feel feeling few field fight figure fill film
final finally financial find fine finger finish fire firm fish five floor fly follow food foot force
foreign forget form former forward four free friend front full fund future game garden general
generation girl give glass goal good government great ground grow guess gun guy hair half hand hang
happen happy hard head health hear heart heat heavy help herself high himself history hit hold home
hope hospital hot hotel hour house however huge human hundred husband idea identify image imagine
impact important improve include including increase indeed indicate individual industry information
inside instead institution interest interesting international interview into investment involve
issue item itself job join just keep key kid kill kind kitchen know knowledge land language large
late later laugh law lawyer lay lead leader learn least leave left leg legal less letter level lie
life light like likely list listen little live local long look lose lot love low machine magazine
main maintain major majority make manage management manager many material matter maybe mean measure
media medical meet meeting member memory mention message method middle might military mind minute
miss mission model modern moment money morning most mother mouth move movement movie Mr Mrs music
must myself name nation national natural nature near nearly necessary need network never new news
newspaper nice night nor north note nothing notice now occur offer office officer official often
oil old once one only onto open operation opportunity option order organization others our out
outside own owner page pain painting paper parent part participant particular particularly partner
party pass past patient pattern pay peace people perform performance perhaps person personal phone
physical pick picture piece place plan plant play player point police policy political politics poor
popular position positive possible power practice prepare present president pressure pretty prevent
private probably problem process produce product professional professor program project property
protect prove provide public pull purpose push put quality quickly quite race radio raise range
reach read ready real reality realize really reason receive recent recently recognize record reduce
reflect region relate relationship religious remain remember remove report represent require
research resource respond response responsibility result return reveal rich right rise risk road
rock role room rule run safe save say scene school science scientist score sea season seat section
security see seek seem sell send senior sense series serious serve service set seven several shake
shoot shot should shoulder show side sign significant similar simple simply since sing single sister
sit site situation six size skill skin small smile social society soldier some somebody someone
something sometimes son song soon sort sound south southern space speak special specific speech
spend sport spring staff stage stand standard star start state statement station stay step still
stock stop store story strategy street strong structure student study stuff style subject success
successful such suddenly suffer suggest summer sure surface system table take talk task tax teach
teacher team television tell ten tend term test thank themselves theory there these thing think
those though thought three through throughout throw thus today together tonight too top toward town
trade traditional training travel treat treatment tree trial trip trouble true truth try turn type
understand unit until upon usually various very victim view violence visit voice vote wait walk wall
want war watch water way weapon wear weight well west western whatever whether while whole whom whose
why wide wife will win wind window wish within without wonder work worker world worry would write
writer wrong yard yeah yet young yourself
"""

_NUMBERS = (
    "0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 42 50 62 75 99 100 105 250 500 1000 1625942 2014 2015 "
    "2019 2020 2021 2022 2023 6.8 0.5 0.62 12.5 33.3 1.25 3.14 -2.4 -0.7 1e3 2.0 17.46 84.0"
)


def _builtin_corpus() -> list[str]:
    """Deterministic chart-QA flavoured text: questions, answers, entities and chat pieces."""
    entities = [e.strip() for e in _ENTITIES.replace("\n", "").split("|") if e.strip()]
    words = _CHART_WORDS.split()
    general = _GENERAL_WORDS.split()
    measures = [
        "revenue", "sales", "population", "share", "growth rate", "number of users", "market share",
        "unemployment rate", "GDP", "percentage", "value", "price", "exports", "emissions", "profit",
    ]
    categories = ["countries", "companies", "categories", "bars", "years", "regions", "brands", "groups"]
    numbers = _NUMBERS.split()
    years = [str(y) for y in range(1990, 2031)]
    lines: list[str] = [
        DEFAULT_SYSTEM_MESSAGE,
        "system user assistant",
        "Answer the question with a single word.",
        "Answer the question using a single word or phrase.",
        " ".join(words),
        " ".join(w.capitalize() for w in words),
        " ".join(w.upper() for w in words[:60]),
        " ".join(numbers),
        "Yes No Yes No yes no",
        " ".join(general),
        " ".join(w.capitalize() for w in general),
    ]
    templates = _QUESTION_TEMPLATES.strip().splitlines()
    # Walk entity/measure/year combinations deterministically so every name appears in context.
    for i, e in enumerate(entities):
        f = entities[(i * 7 + 3) % len(entities)]
        for j, template in enumerate(templates[i % 5 :: 5]):
            lines.append(
                template.format(
                    e=e,
                    f=f,
                    m=measures[(i + j) % len(measures)],
                    c=categories[(i + 2 * j) % len(categories)],
                    y=years[(i + j) % len(years)],
                    z=years[(i + 3 * j + 5) % len(years)],
                    n=numbers[(i + j) % len(numbers)],
                )
            )
        lines.append(f"{e} {numbers[i % len(numbers)]} {e.lower()} {e.upper()}")
    return lines


# --------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _train_bpe(
    vocab_size: int, corpus: tuple[str, ...]
) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Train a byte-level BPE with Qwen2's pre-tokenizer; returns (vocab, merges).

    Pure and deterministic (same result in every process), so it is cached per (size, corpus).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same pipeline Qwen2Tokenizer builds around a vocab, so training and use agree. Qwen's
    # regex isolates every digit (\p{N}), so numbers tokenise digit by digit.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk
        special_tokens=[],
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe["merges"])
    return dict(bpe["vocab"]), merges


def build_tokenizer(vocab_size: int = 2048, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE offline and wrap it as a Qwen2 tokenizer.

    `vocab_size` counts everything: the BPE pieces plus Qwen's 14 special tokens (appended after
    the BPE vocabulary, in Qwen's order). `corpus` defaults to a built-in chart-QA corpus. pad is
    `<|endoftext|>`, eos is `<|im_end|>`, and the chat template reproduces Qwen2.5-VL's format.
    """
    from transformers import Qwen2Tokenizer

    n_special = len(QWEN_SPECIAL_TOKENS)
    if vocab_size <= 256 + n_special:
        raise ChartVLMError(
            f"build_tokenizer: vocab_size={vocab_size} is too small; it needs room for the 256 byte "
            f"tokens and {n_special} special tokens (use at least {256 + n_special + 1})"
        )
    lines = tuple(_builtin_corpus() if corpus is None else corpus)
    vocab, merges = _train_bpe(vocab_size - n_special, lines)
    if len(vocab) < vocab_size - n_special:
        logger.warning(
            "BPE corpus too small for vocab_size=%d: trained %d pieces (+%d special tokens)",
            vocab_size, len(vocab), n_special,
        )
    # Qwen2Tokenizer registers its eos/pad/unk as added tokens on construction, so construct it
    # with only <|endoftext|> (first special id, right after the BPE pieces), then append the rest
    # in Qwen's order, then point eos at <|im_end|>.
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token=PAD_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    first_special = len(vocab)
    got = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    if got != list(range(first_special, first_special + len(QWEN_SPECIAL_TOKENS))):
        raise ChartVLMError(f"build_tokenizer: special tokens got unexpected ids {got}")
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerFast, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen2_5_VLProcessor:
    """Wrap `tokenizer` in the stock Qwen2.5-VL processor (image + video processor, chat template).

    Pixel limits default to DEFAULT_MIN_PIXELS / DEFAULT_MAX_PIXELS (chart-friendly, not the stock
    12.8 M-pixel cap). They are stored in the image processor's `size` and survive save/load.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else int(min_pixels)
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ChartVLMError(
            f"build_processor: need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
            f"max_pixels={max_pixels}"
        )
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor()
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _get_preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ChartVLMError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def build_config(preset: str, tokenizer: PreTrainedTokenizerFast):
    """The `Qwen2_5_VLConfig` for `preset`, with every token id taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    spec = _get_preset(preset)
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    vocab_size = spec["model_vocab_size"] or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ChartVLMError(
            f"preset {preset!r}: model vocab_size {vocab_size} is smaller than the tokenizer "
            f"({len(tokenizer)} tokens)"
        )
    text = dict(spec["text"])
    mrope_section = text.pop("mrope_section")
    rope_theta = text.pop("rope_theta")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(mrope_section) * 2 != head_dim:
        raise ChartVLMError(
            f"preset {preset!r}: mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}"
        )
    text_config = {
        **text,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": list(mrope_section),
        },
        "bos_token_id": ids[PAD_TOKEN],  # as the real checkpoints: bos = <|endoftext|>
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "tie_word_embeddings": spec["tie_word_embeddings"],
    }
    vision_config = {
        **spec["vision"],
        "hidden_act": "silu",
        "in_channels": 3,
        "out_hidden_size": text["hidden_size"],  # merger output feeds the LLM directly
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def build_model(
    preset: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised fp32 Qwen2.5-VL for `preset`; identical weights for the same seed.

    The global torch RNG state is left untouched (the seed applies inside a forked RNG). The
    full-size presets need ~15 GB (3B) / ~33 GB (7B) of host memory in fp32.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = build_config(preset, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])
    # As the real checkpoints' generation_config: stop on <|im_end|> or <|endoftext|>; greedy.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False
    )
    model.eval()
    return model


def build_model_and_processor(
    preset: str = "tiny", seed: int = 0, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Build model + processor in-process (no files, no network); deterministic per seed."""
    spec = _get_preset(preset)
    tokenizer = build_tokenizer(spec["tokenizer_vocab_size"])
    processor = build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
    model = build_model(preset, tokenizer, seed=seed)
    logger.info("built %s Qwen2.5-VL (%.2fM params, seed %d)", preset, model.num_parameters() / 1e6, seed)
    return model, processor


def init_model(
    preset: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Path:
    """Write a random `preset` model + tokenizer + processor (+ chat template) to `out_dir`.

    The directory is written under a temporary name next to it and renamed at the end, so a
    crash never leaves a half-written model. Loadable offline with
    `AutoModelForImageTextToText.from_pretrained(out_dir)` / `AutoProcessor.from_pretrained(out_dir)`.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChartVLMError(f"init_model: {out} already exists and is not empty; choose a new directory")
    model, processor = build_model_and_processor(
        preset, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crashed run of this process id
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        make_readable(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote random %s model to %s", preset, out)
    return out
