"""Synthetic ChartQA-style charts: draw a random data table, render it with matplotlib, derive the answers.

Every answer comes from the chart's data table (as in FigureQA/DVQA/PlotQA), so every label is exact.
The pipeline for one chart is `make_chart_spec` (pure data) -> `render_chart` (PNG bytes) ->
`derive_questions` (query/label pairs); `synthesize` runs it for many charts over a process pool and
streams the rows into a `save_to_disk` DatasetDict with splits "train" and "test".

Honesty rule: a question whose answer is a number read off the chart (value retrieval, max/min value,
difference, sum, average, counting against a threshold) is only asked when the chart prints its values
(value labels, or a pie's percentage labels). Questions answered by looking at shapes (argmax, argmin,
yes/no comparison, line peak) are asked on unlabelled charts only when the gap is clearly visible.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import shutil
import tempfile
import textwrap
import time
import warnings
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

CHART_TYPES = ("vertical_bar", "horizontal_bar", "grouped_bar", "line", "pie")
QUESTION_TYPES = (
    "value_retrieval", "argmax", "argmin", "max_value", "min_value", "compare_yes_no",
    "difference", "sum", "average", "count", "legend_mapping", "line_peak",
)
FONT_FAMILIES = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono")
HUMAN_FRACTION = 1 / 3  # share of questions phrased "like a person" and marked human_or_machine = 0
DPI = 100

# Category word lists. No name is a whole word inside another name, and none is a colour word, so a
# query's entities can be found again by whole-word matching (the tests rely on this).
CATEGORY_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "country": ("country", "countries", (
        "Germany", "France", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
        "Australia", "Norway", "Sweden", "Poland", "Egypt", "Kenya", "Chile", "Peru", "Turkey", "Greece",
        "Ireland", "Vietnam", "Argentina", "Portugal", "Austria", "Denmark", "Finland", "Belgium")),
    "company": ("company", "companies", (
        "Samsung", "Xiaomi", "Huawei", "Nokia", "Sony", "Lenovo", "Dell", "Asus", "Acer", "Intel",
        "Amazon", "Alibaba", "Tencent", "Netflix", "Spotify", "Adobe", "Oracle", "Siemens", "Philips",
        "Toyota", "Honda", "Ford", "Tesla", "Nestle")),
    "platform": ("platform", "platforms", (
        "Facebook", "YouTube", "Instagram", "TikTok", "Twitter", "LinkedIn", "Snapchat", "Pinterest",
        "Reddit", "WhatsApp", "Telegram", "Twitch")),
    "sector": ("sector", "sectors", (
        "Agriculture", "Industry", "Services", "Construction", "Mining", "Tourism", "Retail", "Finance",
        "Education", "Health care", "Transport", "Energy")),
    "city": ("city", "cities", (
        "New York", "Los Angeles", "London", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Sydney",
        "Toronto", "Seoul", "Mumbai", "Dubai", "Chicago", "Singapore", "Vienna")),
    "drink": ("drink", "drinks", ("Coffee", "Tea", "Juice", "Milk", "Water", "Soda", "Beer", "Wine")),
}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
SERIES_GROUPS = (
    ("Men", "Women"), ("Urban", "Rural"), ("Online", "In store"), ("Exports", "Imports"),
    ("Public", "Private"), ("Domestic", "International"), ("Q1", "Q2", "Q3", "Q4"),
)

# (value axis label, noun used in questions, low, high, decimal places to choose from, value suffix)
MEASURES = (
    ("Revenue in million U.S. dollars", "revenue", 5, 950, (0, 1), ""),
    ("Share of respondents", "share of respondents", 2, 90, (0, 1), "%"),
    ("Number of users in millions", "number of users", 1, 600, (0, 1), ""),
    ("Growth rate", "growth rate", 0.5, 12, (1, 2), "%"),
    ("Sales in thousand units", "sales", 10, 9500, (0,), ""),
    ("Average price in euros", "average price", 1, 60, (2,), ""),
    ("Number of visitors", "number of visitors", 1000, 98000, (0,), ""),
    ("Index score", "index score", 20, 100, (1,), ""),
    ("Production in million tons", "production", 0.2, 45, (1, 2), ""),
)

# Palettes of colours with plain names (the legend question names the colour). Names are unique
# within a palette and single words.
PALETTES: tuple[dict[str, str], ...] = (
    {"blue": "#1f77b4", "orange": "#ff7f0e", "green": "#2ca02c", "red": "#d62728", "purple": "#9467bd",
     "brown": "#8c564b", "pink": "#e377c2", "gray": "#7f7f7f", "olive": "#bcbd22", "cyan": "#17becf"},
    {"blue": "#4c72b0", "orange": "#dd8452", "green": "#55a868", "red": "#c44e52", "purple": "#8172b3",
     "brown": "#937860", "pink": "#da8bc3", "gray": "#8c8c8c", "yellow": "#ccb974", "cyan": "#64b5cd"},
    {"navy": "#1f3b73", "blue": "#2f80ed", "teal": "#14a098", "green": "#27ae60", "yellow": "#f2c94c",
     "orange": "#f2994a", "red": "#eb5757", "purple": "#9b51e0", "black": "#333333", "gray": "#9e9e9e"},
)


# ----------------------------------------------------------------------------------------------
# Numbers


def format_number(value: Any) -> str:
    """ChartQA label style: minimal digits, no thousands separator, no exponent (12, 6.8, 1200)."""
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if number == 0:
        return "0"
    return format(number.normalize(), "f")


def _dec(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _fixed(value: Any, decimals: int) -> str:
    """How a value label is printed on the chart: always `decimals` places, like a real chart."""
    return f"{_dec(value):.{decimals}f}"


def _average(values: list[Decimal]) -> Decimal:
    return (sum(values) / len(values)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _random_value(rng: random.Random, low: float, high: float, decimals: int) -> int | float:
    scale = 10 ** decimals
    units = rng.randint(max(1, round(low * scale)), round(high * scale))
    return units if decimals == 0 else float(Decimal(units).scaleb(-decimals))


def _pie_shares(rng: random.Random, count: int, decimals: int) -> list[int | float]:
    """Shares that add up to exactly 100 at `decimals` places (largest-remainder rounding)."""
    weights = [rng.uniform(1.0, 5.0) for _ in range(count)]
    total_units = 100 * 10 ** decimals
    raw = [w / sum(weights) * total_units for w in weights]
    units = [int(r) for r in raw]
    by_remainder = sorted(range(count), key=lambda i: (raw[i] - units[i], -i), reverse=True)
    for i in by_remainder[: total_units - sum(units)]:
        units[i] += 1
    if decimals == 0:
        return units
    return [float(Decimal(u).scaleb(-decimals)) for u in units]


# ----------------------------------------------------------------------------------------------
# Chart specs


def make_chart_spec(rng: random.Random, chart_index: int) -> dict:
    """Draw one chart: its data table and its look, as plain JSON-able data (nothing is rendered).

    Keys: chart_id, chart_type, title, category_kind, category_kind_plural, measure, value_axis_label,
    category_axis_label, categories, series ([{name, color, hex, values}]), decimals, value_suffix,
    value_labels, style (width, height, font_family, font_size, grid, ...).
    """
    chart_type = rng.choice(CHART_TYPES)
    axis_label, measure, low, high, decimal_choices, suffix = rng.choice(MEASURES)
    decimals = rng.choice(decimal_choices)
    palette = rng.choice(PALETTES)
    colour_names = list(palette)
    rng.shuffle(colour_names)

    if chart_type == "line":
        if rng.random() < 0.7:
            kind, kinds = "year", "years"
            start, count = rng.randint(2000, 2016), rng.randint(5, 10)
            categories = [str(year) for year in range(start, start + count)]
        else:
            kind, kinds = "month", "months"
            start, count = rng.randint(0, 4), rng.randint(6, 8)
            categories = list(MONTHS[start:start + count])
        n_series = rng.choice((1, 1, 2, 3))
        if n_series == 1:
            series_names = [measure[0].upper() + measure[1:]]
        elif rng.random() < 0.5:
            group = rng.choice([g for g in SERIES_GROUPS if len(g) >= n_series])
            series_names = list(group[:n_series])
        else:
            series_names = rng.sample(CATEGORY_KINDS[rng.choice(("country", "company", "city"))][2], n_series)
        # Labels on several crossing lines would overlap into an unreadable mess.
        value_labels = n_series == 1 and rng.random() < 0.6
    else:
        kind, kinds, names = CATEGORY_KINDS[rng.choice(sorted(CATEGORY_KINDS))]
        value_labels = chart_type == "pie" or rng.random() < 0.65
        if chart_type == "grouped_bar":
            n_series = rng.choice((2, 2, 3))
            count = rng.randint(3, 4 if value_labels else 6)
            if rng.random() < 0.5:
                first = rng.randint(2015, 2022)
                series_names = [str(first + i) for i in range(n_series)]
            else:
                group = rng.choice([g for g in SERIES_GROUPS if len(g) >= n_series])
                series_names = list(group[:n_series])
        else:
            n_series = 1
            count = {"vertical_bar": rng.randint(3, 8), "horizontal_bar": rng.randint(3, 10),
                     "pie": rng.randint(3, 6)}[chart_type]
            series_names = [measure[0].upper() + measure[1:]]
        categories = rng.sample(names, min(count, len(names)))

    if chart_type == "pie":
        # A pie shows shares of a whole: the values are the printed percentages.
        axis_label, measure, suffix = "Share", "share", "%"
        decimals = rng.choice((0, 0, 1))
        series_names = ["Share"]
        all_values = [_pie_shares(rng, len(categories), decimals)]
    else:
        all_values = [[_random_value(rng, low, high, decimals) for _ in categories] for _ in series_names]
        if chart_type == "horizontal_bar" and rng.random() < 0.4:
            # Ranked bar charts (largest on top) are common in the wild.
            order = sorted(range(len(categories)), key=lambda i: _dec(all_values[0][i]), reverse=True)
            categories = [categories[i] for i in order]
            all_values = [[all_values[0][i] for i in order]]

    series = [{"name": name, "color": colour_names[i], "hex": palette[colour_names[i]], "values": values}
              for i, (name, values) in enumerate(zip(series_names, all_values))]
    if chart_type == "pie":
        # Each slice gets its own colour; the table keeps one colour per slice.
        series[0]["slice_colors"] = colour_names[: len(categories)]
        series[0]["slice_hex"] = [palette[name] for name in series[0]["slice_colors"]]

    title = ""
    if rng.random() < 0.75:
        place = rng.choice(("", f" in {rng.randint(2015, 2023)}", " worldwide", ""))
        title = f"{axis_label} by {kind}{place}" if chart_type != "line" else f"{axis_label}{place}"
    width, height = rng.randint(400, 800), rng.randint(300, 600)
    style = {
        "width": width,
        "height": height,
        "font_family": rng.choice(FONT_FAMILIES),
        "font_size": rng.choice((8, 9, 10, 11, 12)),
        "grid": rng.random() < 0.5,
        "hide_top_right_spines": rng.random() < 0.6,
        "bar_width": rng.choice((0.5, 0.6, 0.7, 0.8)),
        # Legends sit outside the axes so they never hide a bar, a point or a printed value.
        "legend_loc": rng.choice(("outside upper center", "outside center right", "outside lower center")),
        "marker": rng.choice(("o", "s", "^", "D", "")),
        "line_width": rng.choice((1.5, 2.0, 2.5)),
        "pie_start_angle": rng.choice((0, 90, 140)),
        "pie_names": rng.choice(("outside", "legend")),
        "show_category_axis_label": rng.random() < 0.5,
    }
    return {
        "chart_id": f"chart-{chart_index:06d}",
        "chart_type": chart_type,
        "title": title,
        "category_kind": kind,
        "category_kind_plural": kinds,
        "measure": measure,
        "value_axis_label": axis_label,
        "category_axis_label": kind.capitalize(),
        "categories": categories,
        "series": series,
        "decimals": decimals,
        "value_suffix": suffix,
        "value_labels": value_labels,
        "style": style,
    }


def chart_table(spec: dict) -> dict:
    """The data table stored with each row (JSON in the `table` column): enough to recompute answers."""
    return {
        "chart_type": spec["chart_type"],
        "title": spec["title"],
        "category_kind": spec["category_kind"],
        "measure": spec["measure"],
        "categories": spec["categories"],
        "series": [{"name": s["name"], "color": s["color"], "values": s["values"]} for s in spec["series"]],
        "value_labels": spec["value_labels"],
        "value_suffix": spec["value_suffix"],
        "decimals": spec["decimals"],
    }


# ----------------------------------------------------------------------------------------------
# Rendering


def _text_colour_on(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def _draw_bars(ax, spec: dict, horizontal: bool) -> None:
    style, decimals, suffix = spec["style"], spec["decimals"], spec["value_suffix"]
    categories, series = spec["categories"], spec["series"]
    positions = list(range(len(categories)))
    group_width = style["bar_width"] if len(series) == 1 else 0.8
    bar_width = group_width / len(series)
    label_size = style["font_size"] - (1 if len(series) == 1 else 2)
    label_rotation = 0
    if spec["value_labels"] and not horizontal:
        # Turn labels upright when they are wider than their bar (rough pixel estimate).
        widest = max(len(_fixed(v, decimals) + suffix) for s in series for v in s["values"])
        bar_px = 0.7 * style["width"] / len(categories) * group_width / len(series)
        label_rotation = 90 if widest * 0.7 * label_size * DPI / 72 > bar_px else 0
    for i, s in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * bar_width
        where = [p + offset for p in positions]
        values = [float(v) for v in s["values"]]
        if horizontal:
            bars = ax.barh(where, values, height=bar_width, color=s["hex"], label=s["name"])
        else:
            bars = ax.bar(where, values, width=bar_width, color=s["hex"], label=s["name"])
        if spec["value_labels"]:
            texts = [_fixed(v, decimals) + suffix for v in s["values"]]
            ax.bar_label(bars, labels=texts, padding=2, fontsize=label_size, rotation=label_rotation)
    category_axis, value_axis = (ax.yaxis, "x") if horizontal else (ax.xaxis, "y")
    rotation = 0
    if not horizontal and (len(categories) > 5 or max(len(c) for c in categories) * len(categories) > 40):
        rotation = 35
    if horizontal:
        ax.set_yticks(positions, labels=categories)
        ax.invert_yaxis()  # first category on top, as it is read
        ax.margins(x=0.15)
    else:
        ax.set_xticks(positions, labels=categories, rotation=rotation, ha="right" if rotation else "center")
        ax.margins(y=0.3 if label_rotation else 0.15)
    ax.ticklabel_format(axis=value_axis, style="plain", useOffset=False)
    (ax.set_xlabel if horizontal else ax.set_ylabel)(spec["value_axis_label"])
    if style["show_category_axis_label"]:
        category_axis.set_label_text(spec["category_axis_label"])
    if style["grid"]:
        ax.grid(axis=value_axis, alpha=0.4)
        ax.set_axisbelow(True)
    if len(series) > 1:
        _add_legend(ax, spec)


def _add_legend(ax, spec: dict) -> None:
    loc = spec["style"]["legend_loc"]
    columns = len(spec["series"]) if loc in ("outside upper center", "outside lower center") else 1
    ax.figure.legend(*ax.get_legend_handles_labels(), loc=loc, ncols=columns,
                     fontsize=spec["style"]["font_size"] - 1, frameon=False)


def _draw_lines(ax, spec: dict) -> None:
    style, categories, series = spec["style"], spec["categories"], spec["series"]
    positions = list(range(len(categories)))
    for s in series:
        values = [float(v) for v in s["values"]]
        ax.plot(positions, values, color=s["hex"], linewidth=style["line_width"], label=s["name"],
                marker=style["marker"] or None, markersize=5)
        if spec["value_labels"]:
            for x, v in enumerate(values):
                # Label above the point unless it is a dip, where the line would run through it.
                neighbours = values[max(x - 1, 0):x] + values[x + 1:x + 2]
                below = v < sum(neighbours) / len(neighbours)
                ax.annotate(_fixed(s["values"][x], spec["decimals"]) + spec["value_suffix"], (x, v),
                            textcoords="offset points", xytext=(0, -7 if below else 7), ha="center",
                            va="top" if below else "bottom", fontsize=style["font_size"] - 1)
    rotation = 35 if len(categories) > 8 else 0
    ax.set_xticks(positions, labels=categories, rotation=rotation, ha="right" if rotation else "center")
    ax.margins(y=0.18)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_ylabel(spec["value_axis_label"])
    if style["show_category_axis_label"]:
        ax.set_xlabel(spec["category_axis_label"])
    if style["grid"]:
        ax.grid(alpha=0.4)
    if len(series) > 1:
        _add_legend(ax, spec)


def _draw_pie(ax, spec: dict) -> None:
    style, categories = spec["style"], spec["categories"]
    values, palette_hex = spec["series"][0]["values"], spec["series"][0]["slice_hex"]
    wedges, _ = ax.pie([float(v) for v in values], colors=palette_hex, startangle=style["pie_start_angle"],
                       counterclock=False, wedgeprops={"edgecolor": "white", "linewidth": 1},
                       labels=categories if style["pie_names"] == "outside" else None,
                       textprops={"fontsize": style["font_size"]})
    for wedge, value, colour in zip(wedges, values, palette_hex):
        angle = math.radians((wedge.theta1 + wedge.theta2) / 2)
        ax.text(0.68 * math.cos(angle), 0.68 * math.sin(angle), _fixed(value, spec["decimals"]) + "%",
                ha="center", va="center", fontsize=style["font_size"] - 1, color=_text_colour_on(colour))
    if style["pie_names"] == "legend":
        ax.legend(wedges, categories, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  fontsize=style["font_size"] - 1, frameon=False)
    ax.set_aspect("equal")


def render_chart(spec: dict) -> bytes:
    """Render a chart spec to PNG bytes (RGB, exactly style width x height pixels, no metadata).

    Byte-identical for the same spec: the figure is drawn with Agg and encoded by Pillow, which
    writes no timestamp or software tag.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    style = spec["style"]
    width, height = style["width"], style["height"]
    rc = {"font.family": style["font_family"], "font.size": style["font_size"], "axes.titlesize": style["font_size"] + 2}
    # Tiny figures make constrained layout warn that it cannot fit everything; the chart is still drawn.
    with matplotlib.rc_context(rc), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained", facecolor="white")
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        kind = spec["chart_type"]
        if kind in ("vertical_bar", "grouped_bar"):
            _draw_bars(ax, spec, horizontal=False)
        elif kind == "horizontal_bar":
            _draw_bars(ax, spec, horizontal=True)
        elif kind == "line":
            _draw_lines(ax, spec)
        elif kind == "pie":
            _draw_pie(ax, spec)
        else:
            raise ChartVLMError(f"chart spec {spec.get('chart_id')}: unknown chart_type {kind!r}")
        if kind != "pie" and style["hide_top_right_spines"]:
            ax.spines[["top", "right"]].set_visible(False)
        if spec["title"]:
            # Wrap long titles instead of letting them run off a narrow figure.
            chars_per_line = max(16, int(width / (0.85 * (style["font_size"] + 2))))
            ax.set_title(textwrap.fill(spec["title"], chars_per_line))
        canvas.draw()
        size = canvas.get_width_height()
        image = Image.frombuffer("RGBA", size, bytes(canvas.buffer_rgba()), "raw", "RGBA", 0, 1).convert("RGB")
    if size != (width, height):
        raise ChartVLMError(f"chart {spec.get('chart_id')}: rendered {size[0]}x{size[1]}, expected {width}x{height}")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Questions


class _Chart:
    """Read-only view of a spec for question writing: values as Decimal, names, readability."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.type = spec["chart_type"]
        self.categories: list[str] = spec["categories"]
        self.series: list[dict] = spec["series"]
        self.values = {s["name"]: [_dec(v) for v in s["values"]] for s in self.series}
        self.multi = len(self.series) > 1
        self.readable = bool(spec["value_labels"]) or self.type == "pie"
        self.kind, self.kinds = spec["category_kind"], spec["category_kind_plural"]
        self.measure = spec["measure"]
        self.scale = max(abs(v) for vs in self.values.values() for v in vs) or Decimal(1)
        self.mark = {"line": "line", "pie": "slice"}.get(self.type, "bar")

    def value(self, series: str, category: str) -> Decimal:
        return self.values[series][self.categories.index(category)]

    def visibly_apart(self, a: Decimal, b: Decimal, gap: float) -> bool:
        """Printed values only need to differ; unlabelled shapes need a gap you can see."""
        if self.readable:
            return a != b
        return abs(a - b) >= Decimal(str(gap)) * self.scale

    def unique_extreme(self, named: dict[str, Decimal], largest: bool) -> str | None:
        """The name holding the max (or min) value, if it is alone there by a readable margin."""
        ranked = sorted(named.items(), key=lambda kv: kv[1], reverse=largest)
        if len(ranked) < 2 or not self.visibly_apart(ranked[0][1], ranked[1][1], 0.05):
            return None
        return ranked[0][0]


def _pick(rng: random.Random, human: bool, augmented: list[str], human_like: list[str]) -> str:
    return rng.choice(human_like if human else augmented)


def _q_value_retrieval(c: _Chart, rng: random.Random, human: bool):
    if not c.readable:
        return None
    cat = rng.choice(c.categories)
    if c.multi:
        s = rng.choice(c.series)["name"]
        query = _pick(rng, human, ["What is the value of {s} in {cat}?", "What is the {m} of {s} in {cat}?"],
                      ["What was the {m} for {s} in {cat}?", "How high was the {m} of {s} in {cat}?"])
    else:
        s = c.series[0]["name"]
        if c.type == "pie":
            query = _pick(rng, human, ["What is the share of {cat}?", "What percentage does {cat} account for?"],
                          ["How big is the slice for {cat}?", "What share of the pie goes to {cat}?"])
        else:
            query = _pick(rng, human, ["What is the value of {cat}?", "What is the {m} of {cat}?"],
                          ["What was the {m} in {cat}?", "According to the chart, what figure is shown for {cat}?"])
    return query.format(s=s, cat=cat, m=c.measure), format_number(c.value(s, cat))


def _q_arg_extreme(c: _Chart, rng: random.Random, human: bool, largest: bool):
    word, human_word = ("highest", "largest") if largest else ("lowest", "smallest")
    if c.multi and (c.type == "line" or rng.random() < 0.5):
        # Across series at one category: "In 2019, which series is highest?"
        cat = rng.choice(c.categories)
        winner = c.unique_extreme({s["name"]: c.value(s["name"], cat) for s in c.series}, largest)
        query = _pick(rng, human, [f"Which series has the {word} value in {{cat}}?"],
                      [f"In {{cat}}, which group recorded the {human_word} {{m}}?"])
        return (query.format(cat=cat, m=c.measure), winner) if winner else None
    if c.type == "line" and largest:
        return None  # the line's maximum is the line_peak family
    s = rng.choice(c.series)["name"]
    winner = c.unique_extreme(dict(zip(c.categories, c.values[s])), largest)
    if not winner:
        return None
    if c.multi:
        query = _pick(rng, human, [f"Which {{kind}} has the {word} value for {{s}}?"],
                      [f"For {{s}}, which {{kind}} shows the {human_word} {{m}}?"])
    elif c.type == "line":
        query = _pick(rng, human, [f"In which {{kind}} was the value the {word}?"],
                      [f"When was the {{m}} at its {word} level?"])
    elif c.type == "pie":
        query = _pick(rng, human, [f"Which {{kind}} has the {word} share?"],
                      [f"Which {{kind}} takes up the {human_word} part of the pie?"])
    else:
        query = _pick(rng, human, [f"Which {{kind}} has the {word} value?", f"Which {{kind}} has the {word} {{m}}?"],
                      [f"Which {{kind}} had the {human_word} {{m}}?", f"Which {{kind}} scores {word}?"])
    return query.format(kind=c.kind, s=s, m=c.measure), winner


def _q_extreme_value(c: _Chart, rng: random.Random, human: bool, largest: bool):
    if not c.readable:
        return None
    word, human_word = ("highest", "largest") if largest else ("lowest", "smallest")
    pick = max if largest else min
    s = ""
    if c.multi and rng.random() < 0.6:
        s = rng.choice(c.series)["name"]
        query = _pick(rng, human, [f"What is the {word} value of {{s}}?"],
                      [f"What was the {human_word} {{m}} recorded for {{s}}?"])
        answer = pick(c.values[s])
    else:
        query = _pick(rng, human, [f"What is the {word} value in the chart?", f"What is the {word} {{m}}?"],
                      [f"What's the {human_word} value shown?", f"How {'high' if largest else 'low'} is the {word} {{m}} in the chart?"])
        answer = pick(v for vs in c.values.values() for v in vs)
    return query.format(s=s, m=c.measure), format_number(answer)


def _q_compare_yes_no(c: _Chart, rng: random.Random, human: bool):
    greater = rng.random() < 0.5
    if c.multi and rng.random() < 0.5:
        cat = rng.choice(c.categories)
        s1, s2 = rng.sample([s["name"] for s in c.series], 2)
        a, b = c.value(s1, cat), c.value(s2, cat)
        if greater:
            query = _pick(rng, human, ["In {cat}, is the value of {s1} greater than that of {s2}?"],
                          ["Did {s1} have a higher {m} than {s2} in {cat}?"])
        else:
            query = _pick(rng, human, ["In {cat}, is the value of {s1} less than that of {s2}?"],
                          ["Was the {m} of {s1} lower than that of {s2} in {cat}?"])
        fields = {"cat": cat, "s1": s1, "s2": s2}
    else:
        s = rng.choice(c.series)["name"]
        cat1, cat2 = rng.sample(c.categories, 2)
        a, b = c.value(s, cat1), c.value(s, cat2)
        suffix = " for {s}" if c.multi else ""
        if greater:
            query = _pick(rng, human, ["Is the value of {c1} greater than that of {c2}" + suffix + "?"],
                          ["Does {c1} have a higher {m} than {c2}" + suffix + "?"])
        else:
            query = _pick(rng, human, ["Is the value of {c1} less than that of {c2}" + suffix + "?"],
                          ["Is the {m} of {c1} lower than that of {c2}" + suffix + "?"])
        fields = {"c1": cat1, "c2": cat2, "s": s}
    if not c.visibly_apart(a, b, 0.08):
        return None
    answer = "Yes" if (a > b) == greater else "No"
    return query.format(m=c.measure, **fields), answer


def _q_difference(c: _Chart, rng: random.Random, human: bool):
    if not c.readable:
        return None
    mode = rng.choice(("two_categories", "range") + (("two_series",) if c.multi else ()))
    if mode == "two_series":
        cat = rng.choice(c.categories)
        s1, s2 = rng.sample([s["name"] for s in c.series], 2)
        a, b = c.value(s1, cat), c.value(s2, cat)
        query = _pick(rng, human, ["What is the difference between {s1} and {s2} in {cat}?"],
                      ["In {cat}, how far apart are {s1} and {s2}?"])
        return query.format(s1=s1, s2=s2, cat=cat), format_number(abs(a - b))
    s = rng.choice(c.series)["name"]
    suffix = " for {s}" if c.multi else ""
    if mode == "range":
        values = c.values[s]
        query = _pick(rng, human, ["What is the difference between the highest and the lowest value" + suffix + "?"],
                      ["How big is the gap between the largest and the smallest {m}" + suffix + "?"])
        return query.format(s=s, m=c.measure), format_number(max(values) - min(values))
    cat1, cat2 = rng.sample(c.categories, 2)
    a, b = c.value(s, cat1), c.value(s, cat2)
    if human:
        if a == b:
            return None
        if a < b:
            cat1, cat2, a, b = cat2, cat1, b, a
        query = "By how much does {c1} exceed {c2}" + suffix + "?"
    else:
        query = "What is the difference between {c1} and {c2}" + suffix + "?"
    return query.format(c1=cat1, c2=cat2, s=s), format_number(abs(a - b))


def _round_number_between(low: Decimal, high: Decimal, decimals: int) -> Decimal:
    """The roundest number strictly between low and high (500 rather than 517.5), so never a tie."""
    middle = (low + high) / 2
    for exponent in range(len(str(int(high))) , -decimals - 2, -1):
        step = Decimal(1).scaleb(exponent)
        candidate = (middle / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step
        if low < candidate < high:
            return candidate
    return middle


def _join(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1]


def _q_sum_or_average(c: _Chart, rng: random.Random, human: bool, average: bool):
    if not c.readable:
        return None
    combine = (lambda vs: _average(vs)) if average else (lambda vs: sum(vs))
    op = "average" if average else "sum"
    modes = ["some_categories"]
    if c.type != "pie" or average:
        modes.append("all_categories")  # every pie sums to 100: not worth asking
    if c.multi:
        modes.append("across_series")
    mode = rng.choice(modes)
    if mode == "across_series":
        cat = rng.choice(c.categories)
        query = _pick(rng, human, [f"What is the {op} of all series in {{cat}}?"],
                      [f"What is the {'average' if average else 'combined'} {{m}} of all groups in {{cat}}?"])
        return query.format(cat=cat, m=c.measure), format_number(combine([c.value(s["name"], cat) for s in c.series]))
    s = rng.choice(c.series)["name"]
    suffix = " for {s}" if c.multi else ""
    if mode == "all_categories":
        query = _pick(rng, human, [f"What is the {op} of all values" + suffix + "?"],
                      ([f"On average, what was the {{m}} across all {{kinds}}" + suffix + "?"] if average else
                       ["What do all {kinds} add up to" + suffix + "?"]))
        return query.format(s=s, m=c.measure, kinds=c.kinds), format_number(combine(c.values[s]))
    chosen = rng.sample(c.categories, rng.randint(2, min(3, len(c.categories))))
    query = _pick(rng, human, [f"What is the {op} of {{names}}" + suffix + "?"],
                  ([f"What is the average {{m}} of {{names}}" + suffix + "?"] if average else
                   ["What do {names} add up to" + suffix + "?"]))
    return (query.format(names=_join(chosen), s=s, m=c.measure),
            format_number(combine([c.value(s, cat) for cat in chosen])))


def _q_count(c: _Chart, rng: random.Random, human: bool):
    modes = ["categories"]
    if c.multi:
        modes.append("series")
    if c.readable:
        modes.append("threshold")
    mode = rng.choice(modes)
    if mode == "series":
        query = _pick(rng, human, ["How many series are shown in the legend?"],
                      ["How many entries does the legend have?"])
        return query, str(len(c.series))
    if mode == "categories":
        if c.type == "pie":
            query = _pick(rng, human, ["How many slices does the pie chart have?"],
                          ["How many {kinds} are included in the pie?"])
        elif c.type in ("vertical_bar", "horizontal_bar"):
            query = _pick(rng, human, ["How many bars are there in the chart?", "How many {kinds} are shown in the chart?"],
                          ["How many different {kinds} does the chart cover?"])
        else:
            query = _pick(rng, human, ["How many {kinds} are shown in the chart?"],
                          ["How many different {kinds} does the chart cover?"])
        return query.format(kinds=c.kinds), str(len(c.categories))
    s = rng.choice(c.series)["name"]
    values = c.values[s]
    # A threshold halfway between two neighbouring distinct values: never equal to a value.
    distinct = sorted(set(values))
    if len(distinct) < 2:
        return None
    i = rng.randrange(len(distinct) - 1)
    threshold = _round_number_between(distinct[i], distinct[i + 1], c.spec["decimals"])
    above = rng.random() < 0.5
    suffix = " for {s}" if c.multi else ""
    if above:
        query = _pick(rng, human, ["How many {kinds} have a value above {t}" + suffix + "?"],
                      ["In how many {kinds} was the {m} above {t}" + suffix + "?"])
        answer = sum(1 for v in values if v > threshold)
    else:
        query = _pick(rng, human, ["How many {kinds} have a value below {t}" + suffix + "?"],
                      ["In how many {kinds} was the {m} below {t}" + suffix + "?"])
        answer = sum(1 for v in values if v < threshold)
    return query.format(kinds=c.kinds, t=format_number(threshold), s=s, m=c.measure), str(answer)


def _q_legend_mapping(c: _Chart, rng: random.Random, human: bool):
    if not c.multi:
        return None
    s = rng.choice(c.series)
    query = _pick(rng, human, ["Which series is represented by the {colour} {mark}?",
                               "What does the {colour} {mark} represent?"],
                  ["What does the {colour} {mark} stand for?", "Which group is shown in {colour}?"])
    return query.format(colour=s["color"], mark=c.mark), s["name"]


def _q_line_peak(c: _Chart, rng: random.Random, human: bool):
    if c.type != "line":
        return None
    s = rng.choice(c.series)["name"]
    winner = c.unique_extreme(dict(zip(c.categories, c.values[s])), largest=True)
    if not winner:
        return None
    if c.multi:
        query = _pick(rng, human, ["In which {kind} did {s} reach its peak?", "At which {kind} does the {s} line peak?"],
                      ["When did {s} peak?", "Which {kind} was the best one for {s}?"])
    else:
        query = _pick(rng, human, ["In which {kind} did the line reach its peak?", "At which {kind} does the line peak?"],
                      ["When did the {m} peak?", "Which {kind} saw the highest {m}?"])
    return query.format(kind=c.kind, s=s, m=c.measure), winner


_QUESTION_WRITERS: dict[str, Callable] = {
    "value_retrieval": _q_value_retrieval,
    "argmax": lambda c, rng, human: _q_arg_extreme(c, rng, human, largest=True),
    "argmin": lambda c, rng, human: _q_arg_extreme(c, rng, human, largest=False),
    "max_value": lambda c, rng, human: _q_extreme_value(c, rng, human, largest=True),
    "min_value": lambda c, rng, human: _q_extreme_value(c, rng, human, largest=False),
    "compare_yes_no": _q_compare_yes_no,
    "difference": _q_difference,
    "sum": lambda c, rng, human: _q_sum_or_average(c, rng, human, average=False),
    "average": lambda c, rng, human: _q_sum_or_average(c, rng, human, average=True),
    "count": _q_count,
    "legend_mapping": _q_legend_mapping,
    "line_peak": _q_line_peak,
}
# Families that only fit some charts are drawn more often so that they are not rare overall.
_FAMILY_WEIGHT = {"legend_mapping": 3.0, "line_peak": 3.0}


def derive_questions(spec: dict, rng: random.Random, k: int) -> list[dict]:
    """Write up to k distinct questions about a chart, each answered from its data table.

    Returns [{query, label: [str], question_type, human_or_machine}]; about a third use human-like
    phrasing (human_or_machine 0), the rest templates (1). Questions whose answer would be ambiguous
    (ties, gaps too small to see, values not printed) are skipped, so fewer than k can come back.
    """
    chart = _Chart(spec)
    # Weighted random order of families (Efraimidis-Spirakis keys), then a few passes over it.
    order = sorted(QUESTION_TYPES, key=lambda f: rng.random() ** (1.0 / _FAMILY_WEIGHT.get(f, 1.0)), reverse=True)
    questions: list[dict] = []
    seen: set[str] = set()
    for _ in range(3):  # first pass: one question per family; later passes only when k is large
        for family in order:
            if len(questions) >= k:
                return questions
            human = rng.random() < HUMAN_FRACTION
            written = _QUESTION_WRITERS[family](chart, rng, human)
            if written is None or written[0] in seen:
                continue
            query, answer = written
            seen.add(query)
            questions.append({"query": query, "label": [answer], "question_type": family,
                              "human_or_machine": 0 if human else 1})
    return questions


# ----------------------------------------------------------------------------------------------
# Dataset


def _features():
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "query": datasets.Value("string"),
        "label": datasets.List(datasets.Value("string")),
        "human_or_machine": datasets.Value("int64"),
        "chart_id": datasets.Value("string"),
        "chart_type": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "table": datasets.Value("string"),
    })


def _chart_rng(seed: int, chart_index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so they are stable across processes and runs.
    return random.Random(f"{seed}-{chart_index}")


def _make_chart_rows(job: tuple[int, int, tuple[int, int] | None, int]) -> list[dict]:
    """Worker: spec -> PNG -> questions for one chart; returns its dataset rows (one per question)."""
    seed, chart_index, image_size, questions_per_chart = job
    rng = _chart_rng(seed, chart_index)
    spec = make_chart_spec(rng, chart_index)
    spec["chart_id"] = f"synth-s{seed}-{chart_index:06d}"
    if image_size is not None:
        spec["style"]["width"], spec["style"]["height"] = image_size
    png = render_chart(spec)
    table = json.dumps(chart_table(spec), ensure_ascii=False, sort_keys=True)
    return [{"image": {"bytes": png, "path": None}, "query": q["query"], "label": q["label"],
             "human_or_machine": q["human_or_machine"], "chart_id": spec["chart_id"],
             "chart_type": spec["chart_type"], "question_type": q["question_type"], "table": table}
            for q in derive_questions(spec, rng, questions_per_chart)]


def _test_chart_indices(n_charts: int, test_fraction: float, seed: int) -> set[int]:
    """Which charts go to the test split: an exact share, drawn from the seed alone."""
    n_test = round(n_charts * test_fraction)
    if test_fraction > 0 and n_charts >= 2:
        n_test = min(max(n_test, 1), n_charts - 1)  # both splits get at least one chart
    return set(random.Random(f"{seed}-split").sample(range(n_charts), n_test))


def _check_arguments(n_charts: int, test_fraction: float, num_workers: int, questions_per_chart: int,
                     image_size: tuple[int, int] | None) -> None:
    if not isinstance(n_charts, int) or n_charts < 1:
        raise ChartVLMError(f"synthesize: n_charts must be a positive integer, got {n_charts!r}")
    if not 0 <= test_fraction < 1:
        raise ChartVLMError(f"synthesize: test_fraction must be in [0, 1), got {test_fraction!r}")
    if num_workers < 0:
        raise ChartVLMError(f"synthesize: num_workers must be >= 0, got {num_workers!r}")
    if questions_per_chart < 1:
        raise ChartVLMError(f"synthesize: questions_per_chart must be >= 1, got {questions_per_chart!r}")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 64):
        raise ChartVLMError(f"synthesize: image_size must be (width, height) of at least 64 px each, got {image_size!r}")


class _ChartRenderer:
    """Renders charts in index order, in-process (num_workers <= 1) or over a spawn process pool."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.pool = None

    def __enter__(self) -> "_ChartRenderer":
        if self.num_workers > 1:
            import multiprocessing

            # spawn: no fork of a parent that may hold threads (pyarrow, torch) or a CUDA context.
            self.pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def rows(self, jobs: list[tuple]) -> Iterator[list[dict]]:
        if self.pool is None:
            return map(_make_chart_rows, jobs)
        # imap keeps chart order, so the output does not depend on the number of workers.
        return self.pool.imap(_make_chart_rows, jobs, chunksize=1)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ChartVLMError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ChartVLMError(f"{out}: folder exists and is not empty; choose another output folder "
                            "or pass overwrite=True (--overwrite) to replace it")


def _move_into_place(built: Path, out: Path) -> None:
    """Swap the finished dataset into out_dir; an old one is only removed once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    built.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dataset_from_rows(rows: Callable[[], Iterator[dict]], features, cache_dir: Path, name: str):
    """Stream rows to an Arrow file; a failure inside `rows` surfaces as itself, not datasets' wrapper."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache_dir),
                                               fingerprint=f"chartvlm-synth-{name}")
    except DatasetGenerationError as error:
        if error.__cause__ is not None:
            raise error.__cause__ from None
        raise


def synthesize(out_dir, n_charts: int, seed: int = 0, test_fraction: float = 0.2, num_workers: int = 2,
               questions_per_chart: int = 3, image_size: tuple[int, int] | None = None,
               overwrite: bool = False) -> "datasets.DatasetDict":
    """Render n_charts charts into a save_to_disk DatasetDict at out_dir with splits 'train' and 'test'.

    A chart (with all its questions) is in exactly one split, chosen from the seed. Each row:
    image (PNG), query, label (list of str), human_or_machine (0 human-like phrasing, 1 template),
    chart_id, chart_type, question_type, table (the chart's data table as JSON).
    image_size None draws ChartQA-like sizes (400-800 x 300-600 px); a (width, height) tuple fixes it.
    The same seed gives byte-identical images and identical rows for any num_workers.
    Rows are streamed to disk under a temporary folder that is renamed to out_dir at the end, so an
    interrupted run leaves no partial dataset. Raises ChartVLMError if out_dir is a non-empty folder
    and overwrite is False. Returns the saved DatasetDict (memory-mapped from out_dir).
    """
    import datasets
    from tqdm.auto import tqdm

    _check_arguments(n_charts, test_fraction, num_workers, questions_per_chart, image_size)
    image_size = tuple(int(v) for v in image_size) if image_size is not None else None
    out = Path(out_dir).expanduser().resolve()
    _prepare_out_dir(out, overwrite)
    test_indices = _test_chart_indices(n_charts, test_fraction, seed)
    split_indices = {"train": [i for i in range(n_charts) if i not in test_indices], "test": sorted(test_indices)}
    features = _features()

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # our own bar shows the rendering; theirs would double it
    try:
        started = time.perf_counter()
        n_rows = 0
        splits = {}
        with _ChartRenderer(num_workers) as renderer, tqdm(total=n_charts, unit="chart", desc="Rendering charts") as bar:
            for split, indices in split_indices.items():
                jobs = [(seed, i, image_size, questions_per_chart) for i in indices]

                def split_rows(jobs=jobs) -> Iterator[dict]:
                    nonlocal n_rows
                    for chart_rows in renderer.rows(jobs):
                        bar.update(1)
                        n_rows += len(chart_rows)
                        yield from chart_rows

                if jobs:
                    splits[split] = _dataset_from_rows(split_rows, features, work / "cache", f"{split}-{work.name}")
                else:
                    splits[split] = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        seconds = time.perf_counter() - started
        logger.info("Rendered %d charts (%d questions) in %.1f s: %.2f charts/s with %d worker(s)",
                    n_charts, n_rows, seconds, n_charts / max(seconds, 1e-9), max(num_workers, 1))
        datasets.DatasetDict(splits).save_to_disk(str(work / "dataset"))
        _move_into_place(work / "dataset", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    logger.info("Saved %s: %s", out, ", ".join(f"{name} {len(ix)} charts" for name, ix in split_indices.items()))
    return datasets.load_from_disk(str(out))
