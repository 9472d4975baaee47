"""Charts drawn on more than one page: money never shares an axis across currencies, every axis is titled
(with the currency for money), and bars and counts start at zero.

Built as plain dicts validated once by plotly.graph_objects, not with plotly.express or make_subplots:
express takes about 60 ms a figure and make_subplots with update_* about 14 ms, a dict under 1 ms, and the
Overview draws four of them on every run (three runs in a row after a sign-in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import plotly.graph_objects as go

from core.money import format_money

PALETTE = ("#1f5f8b", "#e07b39", "#4c9f70", "#8e6bb8", "#c9a227")
HEIGHT = 360


def count_step(largest: int) -> int:
    """A whole-number tick step giving at most about six ticks (never 0.5 of an anomaly)."""
    steps = (1, 2, 5)
    scale = 1
    while True:
        for step in steps:
            if largest <= 6 * step * scale:
                return step * scale
        scale *= 10


def _float(amount: Decimal) -> float:
    """Amounts become floats only to be drawn; every total the app shows is a Decimal."""
    return float(amount)


def _axis(title: str, **options: Any) -> dict[str, Any]:
    return {"title": {"text": title}, **options}


def _panels(count: int, *, stacked: bool) -> list[dict[str, Any]]:
    """Where each of `count` panels sits: side by side, or one above the other (`stacked`), with its own axes
    (`x`/`y`, `x2`/`y2`, ...) and its title position."""
    gap = (0.3 if stacked else 0.12) if count > 1 else 0.0  # room for the axis title and the next panel's name
    size = (1 - gap * (count - 1)) / count
    panels = []
    for index in range(count):
        start = index * (size + gap)
        span = [start, start + size]
        if stacked:  # the first panel on top
            span = [1 - start - size, 1 - start]
        span = [min(max(round(edge, 6), 0.0), 1.0) for edge in span]
        suffix = "" if index == 0 else str(index + 1)
        panels.append({"x": f"x{suffix}", "y": f"y{suffix}", "xaxis": f"xaxis{suffix}", "yaxis": f"yaxis{suffix}",
                       "domain": span})
    return panels


def _figure(data: list[dict[str, Any]], layout: dict[str, Any]) -> go.Figure:
    """One validated figure from plain dicts: an order of magnitude faster than make_subplots and update_*."""
    return go.Figure({"data": data, "layout": {"margin": {"l": 10, "r": 10, "t": 40, "b": 10}, **layout}})


def money_bars(rows: Sequence[dict[str, Any]], category: str, category_label: str, value_label: str = "Leak", *,
               horizontal: bool = False, label: Callable[[Any], str] = str) -> go.Figure:
    """`rows` ({category, currency, amount}) as bars, one panel per currency with its own axis
    (`Leak (USD)`), so that 361 EUR is never drawn on the same scale as 333 USD."""
    currencies = sorted({row["currency"] for row in rows})
    panels = _panels(max(len(currencies), 1), stacked=horizontal)
    data: list[dict[str, Any]] = []
    layout: dict[str, Any] = {"height": max(HEIGHT, 220 * len(panels)) if horizontal else HEIGHT, "annotations": []}
    for index, (currency, panel) in enumerate(zip(currencies, panels, strict=False)):
        part = [row for row in rows if row["currency"] == currency]
        names = [label(row[category]) for row in part]
        amounts = [_float(row["amount"]) for row in part]
        unit = currency.upper()
        data.append({"type": "bar", "x": amounts if horizontal else names, "y": names if horizontal else amounts,
                     "orientation": "h" if horizontal else "v", "name": unit, "showlegend": False,
                     "marker": {"color": PALETTE[index % len(PALETTE)]}, "xaxis": panel["x"], "yaxis": panel["y"],
                     "hovertemplate": (f"%{{y}}: %{{x:,.2f}} {unit}" if horizontal else f"%{{x}}: %{{y:,.2f}} {unit}")
                     + "<extra></extra>"})
        money_axis = _axis(f"{value_label} ({unit})", rangemode="tozero", tickformat=",~f")
        category_axis = _axis(category_label, type="category")
        x_axis, y_axis = (money_axis, category_axis) if horizontal else (category_axis, money_axis)
        layout[panel["xaxis"]] = {**x_axis, "anchor": panel["y"], **({} if horizontal else {"domain": panel["domain"]})}
        layout[panel["yaxis"]] = {**y_axis, "anchor": panel["x"], **({"domain": panel["domain"]} if horizontal else {})}
        if len(panels) > 1:  # which currency each panel shows
            layout["annotations"].append({"text": unit, "showarrow": False, "xref": "paper", "yref": "paper",
                                          "x": 0 if horizontal else sum(panel["domain"]) / 2,
                                          "y": panel["domain"][1] if horizontal else 1.0,
                                          "xanchor": "left" if horizontal else "center", "yanchor": "bottom"})
    return _figure(data, layout)


def count_bars(buckets: Sequence[str], series: Sequence[tuple[str, Sequence[int]]], x_label: str,
               y_label: str) -> go.Figure:
    """Counts per bucket, the series stacked (each anomaly is in one of them), whole-number ticks from 0."""
    data = [{"type": "bar", "x": list(buckets), "y": list(counts), "name": name,
             "marker": {"color": PALETTE[index % len(PALETTE)]},
             "hovertemplate": f"%{{x}}: %{{y:,d}} {name.lower()}<extra></extra>"}
            for index, (name, counts) in enumerate(series)]
    largest = max((sum(column) for column in zip(*(counts for _, counts in series), strict=True)), default=0)
    return _figure(data, {"barmode": "stack", "height": HEIGHT,
                          "legend": {"orientation": "h", "y": 1.12, "x": 0, "traceorder": "normal"},
                          "xaxis": _axis(x_label, type="category"),
                          "yaxis": _axis(y_label, tick0=0, dtick=count_step(largest), tickformat=",d",
                                         rangemode="tozero")})


def expected_vs_billed(rows: Sequence[dict[str, Any]], category_label: str) -> go.Figure:
    """What should have been billed against what was, per `label` ({label, currency, expected, billed}): the
    money gap of anomalies whose units all reached billing (unbilled usage, missed overage, renewal drift,
    over-billing), where a units chart shows no gap. One panel per currency, its axis titled with it."""
    currencies = sorted({row["currency"] for row in rows})
    panels = _panels(max(len(currencies), 1), stacked=False)
    data: list[dict[str, Any]] = []
    layout: dict[str, Any] = {"barmode": "group", "height": HEIGHT, "margin": {"l": 10, "r": 10, "t": 50, "b": 10},
                              "legend": {"orientation": "h", "y": 1.2, "x": 0}, "annotations": []}
    for index, (currency, panel) in enumerate(zip(currencies, panels, strict=False)):
        part = [row for row in rows if row["currency"] == currency]
        unit = currency.upper()
        for series, key, color in (("Expected", "expected", PALETTE[0]), ("Billed", "billed", PALETTE[1])):
            data.append({"type": "bar", "name": series, "x": [row["label"] for row in part],
                         "y": [_float(row[key]) for row in part], "marker": {"color": color},
                         "showlegend": index == 0, "legendgroup": series, "xaxis": panel["x"], "yaxis": panel["y"],
                         "text": [format_money(Decimal(row[key]), currency) for row in part],
                         "textposition": "outside", "cliponaxis": False,
                         "hovertemplate": f"%{{x}} {series.lower()}: %{{y:,.2f}} {unit}<extra></extra>"})
        layout[panel["xaxis"]] = _axis(category_label, type="category", anchor=panel["y"], domain=panel["domain"])
        layout[panel["yaxis"]] = _axis(f"Amount ({unit})", rangemode="tozero", tickformat=",~f", anchor=panel["x"])
        if len(panels) > 1:
            layout["annotations"].append({"text": unit, "showarrow": False, "xref": "paper", "yref": "paper",
                                          "x": sum(panel["domain"]) / 2, "y": 1.0, "xanchor": "center",
                                          "yanchor": "bottom"})
    return _figure(data, layout)


def daily_units(days: Sequence[str], actual: Sequence[float], reported: Sequence[float]) -> go.Figure:
    """An anomaly's daily usage against what reached billing, from 0. Where both agree the reported line lies
    on the actual one: drawn thinner, dashed and with hollow markers on top of a wide solid line, both show."""
    return _figure([
        {"type": "scatter", "x": list(days), "y": list(actual), "mode": "lines+markers", "name": "Actual usage",
         "line": {"width": 5, "color": PALETTE[0]}, "marker": {"size": 9, "symbol": "circle"}},
        {"type": "scatter", "x": list(days), "y": list(reported), "mode": "lines+markers",
         "name": "Reported to billing", "line": {"width": 2, "dash": "dash", "color": PALETTE[1]},
         "marker": {"size": 7, "symbol": "diamond-open", "line": {"width": 2}}},
    ], {"height": 320, "legend": {"orientation": "h", "y": 1.12, "x": 0}, "xaxis": _axis("Day (UTC)"),
        "yaxis": _axis("Units per day", rangemode="tozero", tickformat=",~f")})
