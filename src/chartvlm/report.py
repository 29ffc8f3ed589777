"""Reporting: one self-contained HTML page per evaluation, and the training curves (loss; rewards for GRPO).

The page needs no network: the bar chart and every thumbnail are embedded as base64 data URIs,
styles and the "errors only" filter are inline. It shows the headline numbers (and base vs
fine-tuned with the difference when a baseline is given), accuracy by split and by question
type, the reward curves when the evaluated model was trained with GRPO, the exact prompt and
generation settings (so a score can be reproduced) and a browsable table of predictions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chartvlm.io import atomic_write_bytes, atomic_write_text
from chartvlm.metrics import SPLIT_ORDER
from chartvlm.results import EvalResult

if TYPE_CHECKING:
    import PIL.Image

logger = logging.getLogger(__name__)

THUMBNAIL_WIDTH = 160
# Written next to a GRPO run's model: its rewards, KL and completion lengths over the steps.
REWARD_CURVES = "reward_curves.png"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pos { color: #1a7f37; } .neg { color: #c62828; } .muted { color: #777; font-size: 0.85em; }
.warn { background: #fff4e5; border: 1px solid #f0b429; padding: 0.5em 1em; }
img#accuracy-chart, img#reward-curves { max-width: 100%; height: auto; }
pre { background: #f7f7f7; padding: 0.6em; white-space: pre-wrap; max-width: 60em; }
td.mark { font-size: 1.3em; text-align: center; } tr[data-correct="1"] td.mark { color: #1a7f37; }
tr[data-correct="0"] td.mark { color: #c62828; } .empty { color: #999; font-style: italic; }
"""

# Hides the rows the model got right; the count line says what is shown.
_FILTER_JS = """
(function () {
  var box = document.getElementById('errors-only');
  var count = document.getElementById('row-count');
  function apply() {
    var rows = document.querySelectorAll('#predictions tbody tr');
    var shown = 0;
    rows.forEach(function (row) {
      var hide = box.checked && row.getAttribute('data-correct') === '1';
      row.style.display = hide ? 'none' : '';
      if (!hide) { shown += 1; }
    });
    count.textContent = shown + ' of ' + rows.length + ' rows shown';
  }
  box.addEventListener('change', apply);
  apply();
})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _fmt_delta(current: float | None, base: float | None) -> str:
    if current is None or base is None:
        return "<td class='num'>—</td>"
    delta = current - base
    css = "pos" if delta > 0 else "neg" if delta < 0 else ""
    return f"<td class='num {css}'>{delta:+.2f}</td>"


def _fmt_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, ensure_ascii=False, default=str)


def _summary(result: EvalResult) -> dict:
    return {"overall": result.overall, "by_split": result.by_split, "by_question_type": result.by_question_type}


def _accuracy_rows(summary: dict) -> list[tuple[str, dict | None]]:
    """(display name, {"accuracy", "correct", "total"}) for overall and each split."""
    rows = [("overall", summary.get("overall"))]
    rows += [(name, entry) for name, entry in summary.get("by_split", {}).items()]
    return rows


def _ordered_union(*names: list[str], first: tuple[str, ...] = ()) -> list[str]:
    seen = [name for name in first if any(name in group for group in names)]
    for group in names:
        seen += [name for name in group if name not in seen]
    return seen


def _headline_html(summary: dict, base: dict | None) -> str:
    if base is None:
        cells = "".join(
            f"<tr><th>{_esc(name)}</th><td class='num'>{_fmt_pct(entry['accuracy'])}</td>"
            f"<td class='num'>{entry['correct']} / {entry['total']}</td></tr>"
            for name, entry in _accuracy_rows(summary)
            if entry is not None
        )
        return f"<table class='headline'><tr><th></th><th>accuracy (%)</th><th>correct / n</th></tr>{cells}</table>"

    def section(group: str, names: list[str]) -> str:
        out = ""
        for name in names:
            current = summary["overall"] if group == "overall" else summary.get(group, {}).get(name)
            before = base["overall"] if group == "overall" else base.get(group, {}).get(name)
            cur_acc = current["accuracy"] if current else None
            base_acc = before["accuracy"] if before else None
            n = current["total"] if current else before["total"]
            out += (
                f"<tr><th>{_esc(name)}</th><td class='num'>{_fmt_pct(base_acc)}</td>"
                f"<td class='num'>{_fmt_pct(cur_acc)}</td>{_fmt_delta(cur_acc, base_acc)}"
                f"<td class='num'>{n}</td></tr>"
            )
        return out

    splits = _ordered_union(list(base.get("by_split", {})), list(summary.get("by_split", {})), first=SPLIT_ORDER)
    body = section("overall", ["overall"]) + section("by_split", splits)
    return (
        "<table class='headline'><tr><th></th><th>base (%)</th><th>fine-tuned (%)</th>"
        f"<th>Δ (points)</th><th>n</th></tr>{body}</table>"
    )


def _question_type_html(summary: dict, base: dict | None) -> str:
    current = summary.get("by_question_type", {})
    before = (base or {}).get("by_question_type", {})
    names = _ordered_union(sorted(before), sorted(current))
    if not names:
        return ""
    rows = ""
    for name in names:
        cur, old = current.get(name), before.get(name)
        cur_acc = cur["accuracy"] if cur else None
        n = cur["total"] if cur else old["total"]
        if base is None:
            rows += f"<tr><th>{_esc(name)}</th><td class='num'>{_fmt_pct(cur_acc)}</td><td class='num'>{n}</td></tr>"
        else:
            base_acc = old["accuracy"] if old else None
            rows += (
                f"<tr><th>{_esc(name)}</th><td class='num'>{_fmt_pct(base_acc)}</td>"
                f"<td class='num'>{_fmt_pct(cur_acc)}</td>{_fmt_delta(cur_acc, base_acc)}<td class='num'>{n}</td></tr>"
            )
    header = (
        "<tr><th>question type</th><th>accuracy (%)</th><th>n</th></tr>"
        if base is None
        else "<tr><th>question type</th><th>base (%)</th><th>fine-tuned (%)</th><th>Δ (points)</th><th>n</th></tr>"
    )
    return f"<h2>By question type</h2><table>{header}{rows}</table>"


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: the page should carry nothing but our own content.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _accuracy_chart_png(summary: dict, base: dict | None) -> bytes:
    """Grouped bars: accuracy by split (with overall) and, if any, by question type."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    split_names = ["overall"] + _ordered_union(
        list((base or {}).get("by_split", {})), list(summary.get("by_split", {})), first=SPLIT_ORDER
    )
    type_names = _ordered_union(
        sorted((base or {}).get("by_question_type", {})), sorted(summary.get("by_question_type", {}))
    )

    def values(source: dict, group: str, names: list[str]) -> list[float]:
        out = []
        for name in names:
            entry = (
                source.get("overall") if name == "overall" and group == "by_split" else source.get(group, {}).get(name)
            )
            out.append(entry["accuracy"] if entry else 0.0)
        return out

    panels = [("by split", "by_split", split_names)]
    if type_names:
        panels.append(("by question type", "by_question_type", type_names))
    widths = [max(2, len(names)) for _, _, names in panels]
    fig = Figure(figsize=(min(16, 2.5 + 0.9 * sum(widths) * (2 if base else 1)), 4.2))
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    series = [("fine-tuned", summary, "#1f77b4")]
    if base is not None:
        series = [("base", base, "#aaaaaa")] + series
    bar_width = 0.8 / len(series)
    for ax, (panel_title, group, names) in zip(axes, panels, strict=True):
        for index, (label, source, colour) in enumerate(series):
            positions = [i + (index - (len(series) - 1) / 2) * bar_width for i in range(len(names))]
            bars = ax.bar(positions, values(source, group, names), bar_width, label=label, color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(
            names,
            rotation=30 if group == "by_question_type" else 0,
            ha="right" if group == "by_question_type" else "center",
            fontsize=8,
        )
        ax.set_ylim(0, 105)
        ax.set_ylabel("relaxed accuracy (%)")
        ax.set_title(f"accuracy {panel_title}")
    if base is not None:
        # Above the panels: inside them it would cover bars near 0 or 100.
        fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncol=2, fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
    else:
        fig.tight_layout()
    return _figure_png(fig)


def _thumbnail_uri(image: PIL.Image.Image) -> tuple[str, int, int]:
    from PIL import Image

    image = image.convert("RGB")  # JPEG has no alpha or palette
    if image.width > THUMBNAIL_WIDTH:
        height = max(1, round(image.height * THUMBNAIL_WIDTH / image.width))
        # reducing_gap: a cheap box pre-shrink first; ~2x faster on 800 px charts, same look at 160 px.
        image = image.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.width, image.height


def _text_cell(text: Any) -> str:
    if text is None or text == "":
        return "<span class='empty'>(empty)</span>"
    return _esc(text)


def _row_key(row: dict, index: int) -> Any:
    return row.get("id", index)


def _table_html(
    predictions: list[dict],
    images: Callable[[dict], PIL.Image.Image],
    base_rows: dict | None,
    max_rows: int,
) -> str:
    shown = predictions[:max_rows]
    failed_images = 0
    rows_html = []
    for index, row in enumerate(shown):
        key = _row_key(row, index)
        try:
            uri, width, height = _thumbnail_uri(images(row))
            thumb = f"<img src='{uri}' width='{width}' height='{height}' alt='chart {_esc(key)}'>"
        except Exception as exc:  # one unreadable chart should not cost the whole report
            failed_images += 1
            logger.warning("report: no thumbnail for prediction %r: %s", key, exc)
            thumb = f"<span class='empty'>image unavailable: {_esc(exc)}</span>"
        correct = bool(row.get("correct"))
        meta = " · ".join(
            f"{name} {_esc(row[name])}"
            for name in ("id", "split", "question_type", "chart_type")
            if row.get(name) is not None
        )
        labels = row.get("labels", [])
        labels_html = " <span class='muted'>|</span> ".join(
            _esc(label) for label in ([labels] if isinstance(labels, str) else labels)
        )
        cells = [
            f"<td>{thumb}</td>",
            f"<td>{_text_cell(row.get('question'))}<div class='muted'>{meta}</div></td>",
            f"<td>{labels_html}</td>",
            f"<td>{_text_cell(row.get('prediction'))}</td>",
        ]
        attrs = f"data-correct='{int(correct)}'"
        if base_rows is not None:
            base_row = base_rows.get(key)
            if base_row is None:
                cells.append("<td><span class='empty'>(no base prediction)</span></td>")
            else:
                base_correct = bool(base_row.get("correct"))
                attrs += f" data-base-correct='{int(base_correct)}'"
                mark = "✓" if base_correct else "✗"
                cells.append(f"<td>{_text_cell(base_row.get('prediction'))} <span class='muted'>{mark}</span></td>")
        cells.append(f"<td class='mark' title='{'correct' if correct else 'wrong'}'>{'✓' if correct else '✗'}</td>")
        rows_html.append(f"<tr {attrs}>{''.join(cells)}</tr>")

    header = "<th>chart</th><th>question</th><th>labels</th><th>prediction</th>"
    if base_rows is not None:
        header = "<th>chart</th><th>question</th><th>labels</th><th>fine-tuned</th><th>base</th>"
    header += "<th>correct</th>"
    notes = []
    omitted = len(predictions) - len(shown)
    if omitted > 0:
        notes.append(
            f"Showing the first {len(shown)} of {len(predictions)} predictions; "
            f"{omitted} omitted (max_rows={max_rows})."
        )
    if failed_images:
        notes.append(f"{failed_images} chart image(s) could not be loaded (see the log).")
    notes_html = "".join(f"<p class='warn'>{_esc(note)}</p>" for note in notes)
    return (
        "<h2>Predictions</h2>"
        f"{notes_html}"
        "<p><label><input type='checkbox' id='errors-only'> errors only</label> "
        "<span id='row-count' class='muted'></span></p>"
        f"<table id='predictions'><thead><tr>{header}</tr></thead><tbody>{''.join(rows_html)}</tbody></table>"
    )


def _key_value_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{_esc(key)}</th><td>{_esc(_fmt_value(value))}</td></tr>" for key, value in items.items())
    return f"<table>{rows}</table>"


def _prompt_html(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, indent=2, ensure_ascii=False, default=str)
    return f"<pre>{_esc(text)}</pre>"


def _run_items(result: EvalResult) -> dict:
    q = result.questions
    evaluated = f"{q['evaluated']:,} of {q['in_split']:,}" if q.get("in_split") else f"{q['evaluated']:,}"
    items = {"model": result.model, "adapter": result.adapter or "(none)", "dataset": result.dataset,
             "split": result.split, "questions": evaluated + (f" (test_subset={q['test_subset']}, seed "
                                                               f"{q['subset_seed']})" if q.get("test_subset") else
                                                               " (the whole split)"),
             "bad rows": f"{q.get('skipped', 0)} left out (on_bad_sample={q.get('on_bad_sample')}), "
                         f"{q.get('duplicated', 0)} exact duplicates kept",
             "metric": result.metric, "prompt style": result.prompt_style,
             "pixels": ", ".join(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
                                 for key, value in result.pixels.items() if value is not None)}
    backend = result.backend
    items["backend"] = "in-process" if backend.get("name") == "inprocess" else (
        f"{backend.get('name')}: {backend.get('served_model')} at {backend.get('base_url')} "
        f"({backend.get('request_concurrency')} requests at a time)")
    items.update({f"digest of the {name}": value for name, value in result.fingerprint.items() if value})
    if result.reasoning:
        items["answers"] = "after reasoning: the text after </think> is scored"
    items["chartvlm"] = result.chartvlm_version
    return items


def _settings_html(result: EvalResult, base: EvalResult | None) -> str:
    parts = ["<h2>Run</h2>", _key_value_table(_run_items(result))]
    if base is not None:
        parts.append(f"<p class='muted'>Compared with: {_esc(base.model)}"
                     f"{' + ' + _esc(base.adapter) if base.adapter else ''}</p>")
    parts += ["<h2>Throughput</h2>", _key_value_table(result.throughput)]
    parts += ["<h2>Prompt</h2>", _prompt_html(result.prompt)]
    if base is not None and base.prompt != result.prompt:
        parts.append("<p class='warn'>The base model was evaluated with a different prompt; the scores are not "
                     "directly comparable. Base prompt:</p>")
        parts.append(_prompt_html(base.prompt))
    parts += ["<h2>Generation settings</h2>", _key_value_table(result.generation)]
    if base is not None and base.generation != result.generation:
        parts.append("<p class='warn'>The base model was evaluated with different generation settings. "
                     "Base settings:</p>")
        parts.append(_key_value_table(base.generation))
    return "".join(parts)


def _comparison_notes(summary: dict, base: dict, predictions: list[dict], base_rows: dict) -> str:
    notes = []
    if summary["overall"]["total"] != base["overall"]["total"]:
        notes.append(
            f"<p class='warn'>Different numbers of samples: base {base['overall']['total']}, "
            f"fine-tuned {summary['overall']['total']}.</p>"
        )
    fixed = broken = 0
    for index, row in enumerate(predictions):
        base_row = base_rows.get(_row_key(row, index))
        if base_row is None:
            continue
        now, before = bool(row.get("correct")), bool(base_row.get("correct"))
        fixed += now and not before
        broken += before and not now
    notes.append(
        f"<p>Fixed by fine-tuning (base wrong, fine-tuned right): <b>{fixed}</b>; "
        f"broken (base right, fine-tuned wrong): <b>{broken}</b>.</p>"
    )
    return "".join(notes)


def write_report(
    out_path: str | os.PathLike,
    result: EvalResult,
    predictions: list[dict],
    images: Callable[[dict], PIL.Image.Image],
    baseline: tuple[EvalResult, list[dict]] | None = None,
    title: str = "chartvlm evaluation",
    max_rows: int = 2000,
) -> Path:
    """Write one self-contained HTML report of an evaluation and return its path.

    `result` is the evaluation's results (metrics.json); `predictions` its predictions.jsonl rows ({"id",
    "question", "labels", "prediction", "correct", "split", "question_type", "chart_type"}); `images(row)`
    returns the chart as a PIL image (a failure is logged and shown in place of that thumbnail). `baseline`
    is the (results, predictions) pair of a base model: headline, chart and table then compare the two, rows
    matched by "id". At most `max_rows` table rows are written; the page says how many were left out. The
    file is written atomically.
    """
    summary = _summary(result)
    base_summary = base_rows = None
    if baseline is not None:
        base_result, base_predictions = baseline
        base_summary = _summary(base_result)
        base_rows = {_row_key(row, index): row for index, row in enumerate(base_predictions)}

    chart_uri = "data:image/png;base64," + base64.b64encode(_accuracy_chart_png(summary, base_summary)).decode("ascii")
    subtitle = " · ".join(_esc(value) for value in (result.model, result.dataset, result.split) if value)
    subset = result.subset_line()
    body = [
        f"<h1>{_esc(title)}</h1><p class='muted'>{subtitle}</p>",
        f"<p class='warn'>{_esc(subset)}</p>" if subset else "",
        "<h2>Relaxed accuracy</h2>",
        _headline_html(summary, base_summary),
    ]
    if base_summary is not None:
        body.append(_comparison_notes(summary, base_summary, predictions, base_rows))
    body += [
        f"<p><img id='accuracy-chart' src='{chart_uri}' alt='accuracy by split and question type'></p>",
        _question_type_html(summary, base_summary),
        _training_html(result),
        _settings_html(result, baseline[0] if baseline is not None else None),
        _table_html(predictions, images, base_rows, max_rows),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + f"\n<script>{_FILTER_JS}</script>\n</body></html>\n"
    )
    path = atomic_write_text(out_path, page)
    logger.info("report: wrote %s (%d predictions, %.1f MB)", path, len(predictions), path.stat().st_size / 1e6)
    return path


def plot_loss_curve(log_history: list[dict], out_png: str | os.PathLike) -> Path | None:
    """Plot training "loss" and "eval_loss" against "step" from `Trainer.state.log_history`.

    Entries without "step" or without either loss (the final "train_loss" summary, learning-rate
    only logs) are skipped. Returns the PNG path, or None (nothing written) if there is no point.
    """
    train = [(entry["step"], entry["loss"]) for entry in log_history if "step" in entry and "loss" in entry]
    evaluation = [
        (entry["step"], entry["eval_loss"]) for entry in log_history if "step" in entry and "eval_loss" in entry
    ]
    if not train and not evaluation:
        logger.info("report: no loss values in the log history; no loss curve written")
        return None

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for points, label, style in ((train, "training loss", "-"), (evaluation, "eval loss", "o-")):
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write_bytes(Path(out_png), _figure_png(fig))


def _rewards_logged(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "step" in entry and "reward" in entry]


def _logged(entry: dict, key: str) -> float:
    """A logged number, NaN where it is missing or None (TRL logs None for a reward that scored nothing)."""
    value = entry.get(key)
    return float("nan") if value is None else float(value)


def reward_curves_png(log_history: list[dict]) -> bytes | None:
    """GRPO's logged rewards over the steps (`Trainer.state.log_history`): the weighted total and each reward's
    mean with a band of one standard deviation, the KL to the starting model, and the completion lengths.
    None when nothing was logged."""
    entries = _rewards_logged(log_history)
    if not entries:
        return None
    from matplotlib.figure import Figure

    steps = [entry["step"] for entry in entries]
    names = sorted({key.split("/")[1] for entry in entries for key in entry
                    if key.startswith("rewards/") and key.endswith("/mean")})
    fig = Figure(figsize=(11, 3.6))
    rewards, kl, lengths = fig.subplots(1, 3)
    for label, mean_key, std_key in [("total (weighted)", "reward", "reward_std"),
                                     *((name, f"rewards/{name}/mean", f"rewards/{name}/std") for name in names)]:
        mean = [_logged(entry, mean_key) for entry in entries]
        std = [0.0 if math.isnan(value) else value for value in (_logged(entry, std_key) for entry in entries)]
        line, = rewards.plot(steps, mean, "o-" if len(steps) < 30 else "-", label=label, markersize=3)
        rewards.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=line.get_color(), alpha=0.15)
    rewards.set_title("rewards (mean, ±1 std)")
    rewards.legend(fontsize=8)
    if any("kl" in entry for entry in entries):
        kl.plot(steps, [_logged(entry, "kl") for entry in entries], "-", color="tab:red")
    kl.set_title("KL to the starting model" if any("kl" in e for e in entries) else "KL (not computed: beta 0)")
    for key, label in (("completions/mean_length", "mean"), ("completions/max_length", "longest")):
        lengths.plot(steps, [_logged(entry, key) for entry in entries], "-", label=label)
    lengths.set_title("completion length (tokens)")
    lengths.legend(fontsize=8)
    for ax in (rewards, kl, lengths):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def plot_reward_curves(log_history: list[dict], out_png: str | os.PathLike) -> Path | None:
    """`reward_curves_png` written to `out_png` (None, nothing written, when no reward was logged)."""
    png = reward_curves_png(log_history)
    return None if png is None else atomic_write_bytes(Path(out_png), png)


def trained_log_history(folder: str | None) -> list[dict] | None:
    """The log history of the GRPO run that wrote `folder` (a trained model or adapter), else None."""
    from chartvlm.config import load_run_config

    if not folder or not Path(folder).is_dir():
        return None
    if load_run_config(folder).get("train", {}).get("method") != "grpo":
        return None
    try:
        return json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    except (OSError, ValueError, KeyError):
        logger.warning("report: %s has no readable trainer_state.json; no reward curves", folder)
        return None


def _training_html(result: EvalResult) -> str:
    """The reward curves of the GRPO run that trained the evaluated adapter or model, if it was one."""
    folder = result.adapter or result.model
    history = trained_log_history(folder)
    png = reward_curves_png(history) if history else None
    if png is None:
        return ""
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    last = _rewards_logged(history)[-1]
    return (f"<h2>GRPO training</h2><p class='muted'>{_esc(folder)}: {len(_rewards_logged(history))} logged steps, "
            f"last mean reward {last['reward']:.3f}</p>"
            f"<p><img id='reward-curves' src='{uri}' alt='GRPO rewards, KL and completion lengths'></p>")
