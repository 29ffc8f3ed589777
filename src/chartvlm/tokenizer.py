"""Tokenizers for offline models: a small byte-level BPE trained on a built-in chart-QA corpus, and the real
Qwen vocabulary read offline from the PyPI package `dashscope`.

Both use Qwen's pipeline (NFC, Qwen's pre-tokenizer pattern, byte-level BPE) and carry a family's control
tokens (`chartvlm.families`) in the released order. The real vocabulary (Qwen2, Qwen2.5 and Qwen3 use
Qwen-1's 151,643 ranked byte sequences, shipped as `dashscope/resources/qwen.tiktoken`) gives exactly the
ids of the released checkpoints; our small BPE keeps tests fast and, at full model size, puts the control
tokens at their released ids too (unused filler entries in between).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from chartvlm.errors import ChartVLMError
from chartvlm.families import Family

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
QWEN_VOCABULARY = ("dashscope", "resources", "qwen.tiktoken")
QWEN_VOCABULARY_SIZE = 151_643
MODEL_MAX_LENGTH = 32768

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




def build_tokenizer(family: Family, bpe_pieces: int = 2034, model_vocab_size: int | None = None,
                    corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Our small byte-level BPE (`bpe_pieces` pieces trained on `corpus`, by default the built-in chart-QA
    corpus) with `family`'s control tokens.

    Compact (model_vocab_size None): the control tokens follow the BPE pieces, in the released order.
    At a full model size (a shape preset) the ones whose released id is known sit at that id, with unused
    filler entries (which the BPE never produces) before and between them; the others follow."""
    if bpe_pieces <= 256:
        raise ChartVLMError(f"build_tokenizer: bpe_pieces={bpe_pieces} leaves no room beyond the 256 byte tokens")
    lines = tuple(_builtin_corpus() if corpus is None else corpus)
    vocab, merges = _train_bpe(bpe_pieces, lines)
    if len(vocab) < bpe_pieces:
        logger.warning("BPE corpus too small for %d pieces: trained %d", bpe_pieces, len(vocab))
    vocab = dict(vocab)
    known = sorted((token for token in family.tokens if token.id is not None), key=lambda token: token.id)
    unplaced = [token for token in family.tokens if token.id is None]
    added: list = known + unplaced
    if model_vocab_size is not None:
        first = known[0].id
        if first < len(vocab):
            raise ChartVLMError(f"build_tokenizer: {len(vocab)} BPE pieces overlap the control token ids")
        vocab.update((f"<|chartvlm_unused_{i}|>", i) for i in range(len(vocab), first))
        added = []
        for token in known:
            added += [None] * (token.id - first - len(added))  # ids no public source confirms
            added.append(token)
        added += unplaced
        if len(vocab) + len(added) > model_vocab_size:
            raise ChartVLMError(f"build_tokenizer: {len(vocab) + len(added)} tokens exceed {model_vocab_size} rows")
    return _finish(family, vocab, merges, added, released_ids=model_vocab_size is not None)


def qwen_vocabulary_file() -> Path:
    """dashscope's qwen.tiktoken, found without importing dashscope."""
    spec = importlib.util.find_spec(QWEN_VOCABULARY[0])
    if spec is None or not spec.submodule_search_locations:
        raise ChartVLMError("the real Qwen vocabulary is read from the PyPI package dashscope "
                            "(dashscope/resources/qwen.tiktoken): pip install dashscope")
    path = Path(next(iter(spec.submodule_search_locations)), *QWEN_VOCABULARY[1:])
    if not path.is_file():
        raise ChartVLMError(f"{path} is missing from the installed dashscope package")
    return path


def build_qwen_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """The released tokenizer of `family` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the real 151,643-piece vocabulary
    and the family's control tokens at their released ids ("Hello world" -> [9707, 1879])."""
    if not family.real_vocabulary:
        raise ChartVLMError(f"{family.title} has its own vocabulary, which is not available offline; "
                            "use our tokenizer (--tokenizer ours)")
    vocab, merges = _qwen_bpe(str(qwen_vocabulary_file()))
    return _finish(family, dict(vocab), merges, list(family.tokens), released_ids=True)


def _finish(family: Family, vocab: dict, merges, added: list, released_ids: bool) -> PreTrainedTokenizerFast:
    """A Qwen2Tokenizer over (vocab, merges) with `added` appended in order as added tokens (None: an unused
    filler), eos = the family's end token, pad = <|endoftext|>, and the family's published chat template.
    With `released_ids`, every control token whose released id is known must land on it."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), unk_token=None, eos_token=None, pad_token=None,
                               model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False)
    for index, token in enumerate(added):
        text = token.content if token is not None else f"<|chartvlm_unused_{len(vocab) + index}|>"
        special = token is not None and token.special
        tokenizer.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    tokenizer.eos_token = family.end_token
    tokenizer.pad_token = family.pad_token
    tokenizer.chat_template = family.chat_template()
    for index, token in enumerate(added):
        got = tokenizer.convert_tokens_to_ids(token.content) if token is not None else None
        if token is not None and (got != len(vocab) + index or (released_ids and token.id not in (None, got))):
            raise ChartVLMError(f"build_tokenizer: {token.content} got id {got} (released: {token.id})")
    return tokenizer


@functools.lru_cache(maxsize=2)
def _qwen_bpe(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of a tiktoken rank file ("<base64 bytes> <rank>" per line), in the byte-level alphabet a
    Qwen2Tokenizer expects. Every split of a token into two tokens of lower rank is a merge of the token's
    rank: byte-pair encoding with these merges joins, at each step, the adjacent pair whose join has the
    lowest rank, which is the tiktoken algorithm."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                piece, rank = line.split()
                ranks[base64.b64decode(piece)] = int(rank)
            except ValueError:
                raise ChartVLMError(f"{path}:{line_number}: not a '<base64> <rank>' line") from None
    alphabet = _byte_alphabet()

    def text(piece: bytes) -> str:
        return "".join(alphabet[byte] for byte in piece)

    merges = []
    for piece, rank in ranks.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return {text(piece): rank for piece, rank in ranks.items()}, tuple((text(l), text(r)) for *_, l, r in merges)


def _byte_alphabet() -> list[str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order (GPT-2's mapping, which ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet, extra = [""] * 256, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet
