"""Altair charts shared by the pages: metric curves with the training-mode timeline drawn on them.

The mode timeline comes from two places the trainer logs: the metric `mode_code` (0 single, 1 ar,
2 async, 3 gba) gives shaded bands, and tags `vitrine.switch.<step>` = "<from>-><to>" give the
switch points, drawn as labelled rules. Both are optional: a run without them has plain curves.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from app.data import MODE_NAMES

MODE_COLORS = {"single": "#bdbdbd", "ar": "#4c78a8", "async": "#f58518", "gba": "#54a24b"}
X_FIELDS = {"step": ("step", "step"), "wall time (s)": ("wall_s", "seconds since the run started")}


def mode_segments(mode_history: pd.DataFrame) -> pd.DataFrame:
    """Consecutive [start, end) step ranges of one mode from a `mode_code` history."""
    if mode_history.empty:
        return pd.DataFrame(columns=["start", "end", "mode", "start_wall", "end_wall"])
    h = mode_history.sort_values("step")
    code = h["value"].round().astype(int).to_numpy()
    steps = h["step"].to_numpy()
    wall = h["wall_s"].to_numpy() if "wall_s" in h else steps.astype(float)
    cut = np.flatnonzero(np.diff(code)) + 1
    starts = np.r_[0, cut]
    ends = np.r_[cut, len(code) - 1]
    return pd.DataFrame({
        "start": steps[starts], "end": steps[ends],
        "start_wall": wall[starts], "end_wall": wall[ends],
        "mode": [MODE_NAMES.get(int(c), str(c)) for c in code[starts]],
    })


def switches_from_tags(tags: dict[str, str]) -> pd.DataFrame:
    rows = []
    for k, v in tags.items():
        if k.startswith("vitrine.switch."):
            try:
                rows.append({"step": int(k.rsplit(".", 1)[1]), "label": v})
            except ValueError:
                continue
    return pd.DataFrame(rows, columns=["step", "label"]).sort_values("step") if rows else pd.DataFrame(columns=["step", "label"])


def _wall_at(steps: np.ndarray, ref: pd.DataFrame) -> np.ndarray:
    if ref.empty:
        return steps.astype(float)
    r = ref.sort_values("step")
    return np.interp(steps, r["step"].to_numpy(), r["wall_s"].to_numpy())


def _mode_bands(bands: pd.DataFrame | None, xf: str, legend_orient: str) -> list[alt.Chart]:
    """Shaded spans of the mode timeline (AR / GBA / async), filled by mode."""
    if bands is None or bands.empty:
        return []
    s, e = ("start", "end") if xf == "step" else ("start_wall", "end_wall")
    return [alt.Chart(bands).mark_rect(opacity=0.15).encode(
        x=f"{s}:Q", x2=f"{e}:Q",
        fill=alt.Fill("mode:N", scale=alt.Scale(domain=list(MODE_COLORS), range=list(MODE_COLORS.values())),
                      legend=alt.Legend(title="mode", orient=legend_orient)),
        tooltip=["mode:N", "start:Q", "end:Q"])]


def _switch_rules(rules: pd.DataFrame | None, xf: str) -> list[alt.Chart]:
    """A dashed rule and a label at every mode switch."""
    if rules is None or rules.empty:
        return []
    rx = "step" if xf == "step" else "wall_s"
    return [alt.Chart(rules).mark_rule(strokeDash=[4, 3], stroke="#d62728").encode(
                x=f"{rx}:Q", tooltip=["run:N", "label:N", "step:Q"]),
            alt.Chart(rules).mark_text(align="left", dx=3, dy=-4, fill="#d62728", fontSize=10).encode(
                x=f"{rx}:Q", y=alt.value(8), text="label:N")]


def _lines(chart: alt.Chart, xf: str, xtitle: str, ytitle: str | None, points: bool, label_limit: int = 200) -> alt.Chart:
    return chart.mark_line(point=points).encode(
        x=alt.X(f"{xf}:Q", title=xtitle),
        y=alt.Y("value:Q", title=ytitle, scale=alt.Scale(zero=False)),
        color=alt.Color("run:N", legend=alt.Legend(orient="bottom", title=None, labelLimit=label_limit)),
        tooltip=["run:N", "step:Q", alt.Tooltip("wall_s:Q", format=".1f"), alt.Tooltip("value:Q", format=".5g")],
    )


def metric_chart(curves: pd.DataFrame, metric: str, x: str, bands: pd.DataFrame | None = None,
                 rules: pd.DataFrame | None = None, height: int = 220) -> alt.Chart:
    """Lines of `metric` per run (column `run`), with optional mode bands and switch rules."""
    xf, xtitle = X_FIELDS[x]
    d = curves[curves["metric"] == metric]
    layers = [*_mode_bands(bands, xf, "right"), _lines(alt.Chart(d), xf, xtitle, metric, len(d) < 40),
              *_switch_rules(rules, xf)]
    return alt.layer(*layers).properties(height=height, title=metric)


def compare_chart(curves: pd.DataFrame, metrics: list[str], x: str, bands: pd.DataFrame | None = None,
                  rules: pd.DataFrame | None = None, width: int = 390, height: int = 200) -> alt.ConcatChart:
    """One chart of small multiples (a panel per metric, two a row) over one shared dataset.

    One chart rather than one per metric: the browser compiles and draws a single Vega view, which
    on a slow machine is most of a page's time. Runs are told apart by colour, modes by fill.
    """
    xf, xtitle = X_FIELDS[x]
    panels = []
    for metric in metrics:
        n = int((curves["metric"] == metric).sum())
        line = _lines(alt.Chart(), xf, xtitle, None, n < 40, label_limit=400).transform_filter(
            alt.datum.metric == metric)
        layers = [*_mode_bands(bands, xf, "bottom"), line, *_switch_rules(rules, xf)]
        panels.append(alt.layer(*layers).properties(title=metric, width=width, height=height))
    return alt.concat(*panels, columns=2, data=curves)


def with_wall(rules: pd.DataFrame, curves_of_run: pd.DataFrame) -> pd.DataFrame:
    """Switch rules placed on the wall-time axis too (interpolated from the run's own points)."""
    if rules.empty:
        return rules.assign(wall_s=pd.Series(dtype=float))
    return rules.assign(wall_s=_wall_at(rules["step"].to_numpy(), curves_of_run))


def bar(frame: pd.DataFrame, x: str, y: str, highlight: str | None = None, title: str = "", height: int = 200) -> alt.Chart:
    enc = {"x": alt.X(f"{x}:N", title=x), "y": alt.Y(f"{y}:Q", title=y), "tooltip": list(frame.columns)}
    if highlight:
        enc["color"] = alt.Color(f"{highlight}:N", scale=alt.Scale(domain=[False, True], range=["#4c78a8", "#d62728"]),
                                 legend=alt.Legend(title=highlight))
    return alt.Chart(frame).mark_bar().encode(**enc).properties(height=height, title=title)


def lines(frame: pd.DataFrame, x: str, y: str, color: str, title: str = "", height: int = 200) -> alt.Chart:
    return alt.Chart(frame).mark_line().encode(
        x=alt.X(f"{x}:Q", title=x), y=alt.Y(f"{y}:Q", title=title or y, scale=alt.Scale(zero=False)),
        color=alt.Color(f"{color}:N", legend=alt.Legend(orient="bottom", title=None)),
        tooltip=list(frame.columns)).properties(height=height, title=title)


def legend_order(labels, known=()) -> list[str]:
    """The distinct labels (as text) in the order a legend should list them: first those named in
    `known`, in that order (e.g. colour names by their code); then numeric labels by value (1, 2, 10;
    a nominal legend otherwise sorts them as text: 1, 10, 2); then the rest alphabetically (OOV,
    "not shown as an ad")."""
    rank = {str(k): i for i, k in enumerate(known)}

    def key(label: str) -> tuple:
        if label in rank:
            return (0, rank[label], 0.0, "")
        try:
            value = float(label)
        except ValueError:
            value = float("nan")
        if value == value:  # not NaN: a number
            return (1, 0, value, label)
        return (2, 0, 0.0, label)

    return sorted(dict.fromkeys(str(v) for v in labels), key=key)
