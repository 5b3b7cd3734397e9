"""Reporting shared by the pipelines (``pipelines.mnist1d``, ``pipelines.textlm``) and
``tools/bench_train.py``: mean ± std over seeds, the printed per-method table, the
quality-against-time plot and the end of a pipeline run (results.json and the printed summary).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable


def fmt(values: list[float], digits: int) -> str:
    """``mean`` of one value, ``mean ± std`` of more, with ``digits`` decimals."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def stats(values: list[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of ``values`` (std 0.0 for a single value)."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def align(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns, a dashed rule under the first (the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def runs_table(runs: list[dict[str, Any]], methods: list[str], quality: str,
               extra: tuple[str, Callable[[str, list[dict[str, Any]]], str]] | None = None) -> str:
    """One row per method (mean ± std over seeds): seeds, train s, backprop, forwarded, and the
    runs' ``final_<quality>`` and ``best_<quality>``; ``extra``: (header, cell of (method, runs))
    for one more column."""
    head = ["method", "seeds", "train s", "backprop", "forwarded", f"final {quality}",
            f"best {quality}"]
    if extra is not None:
        head.append(extra[0])
    rows = [head]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = [m, ",".join(str(r["seed"]) for r in rs),
               fmt([r["wall_clock_s"] for r in rs], 1),
               fmt([r["samples_backpropagated"] for r in rs], 0),
               fmt([r["samples_forwarded"] for r in rs], 0),
               fmt([r[f"final_{quality}"] for r in rs], 4), fmt([r[f"best_{quality}"] for r in rs], 4)]
        if extra is not None:
            row.append(extra[1](m, rs))
        rows.append(row)
    return align(rows)


def seed_band(curves: list[list[list[float]]], points: int = 100) -> tuple[Any, Any, Any, Any]:
    """Seeds' curves ``[[t, q], ...]`` on one time grid: ``(t, mean, min, max)`` arrays.

    Seeds are evaluated at different wall-clock times, so each curve is linearly interpolated
    onto ``points`` times from the latest first evaluation to the earliest last one: the band
    covers only times every seed measured (nothing extrapolated). Seeds whose times do not
    overlap give empty arrays. The band is min..max over seeds (with 2-3 seeds a ±std band
    would claim a spread the data cannot show)."""
    import numpy as np

    curves = [c for c in curves if c]
    if not curves:
        return (np.empty(0),) * 4
    start, stop = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if stop < start:
        return (np.empty(0),) * 4
    t = np.linspace(start, stop, points if stop > start else 1)
    q = np.stack([np.interp(t, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return t, q.mean(axis=0), q.min(axis=0), q.max(axis=0)


def plot_curves(runs: list[dict[str, Any]], methods: list[str], path: Path, title: str,
                ylabel: str, *, labels: dict[str, str] | None = None,
                target: float | None = None, ylim: tuple[float, float] | None = None,
                xlabel: str = "training wall-clock (s, evaluation excluded)") -> None:
    """Quality against training wall-clock, one colour per method: the mean over seeds as a
    line, the min..max over seeds shaded (:func:`seed_band`, over the times every seed
    measured), each seed a thin line with its evaluations as dots (so the ends outside the
    band, or seeds that never overlap, still show); a method run with one seed: its curve.
    ``runs``: results with ``method`` and ``curve`` (``[[t, quality], ...]``); ``labels``:
    legend names of the methods; ``target``: a dashed horizontal line; ``ylim``: the quality
    axis's range; ``xlabel``: what the curves' times are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from es_stream.plot import save_figure

    many = len(methods) > 4  # then: legend beside the axes, fainter bands (they overlap)
    fig, ax = plt.subplots(figsize=(11, 5.5) if many else (8, 5))
    for i, m in enumerate(methods):
        curves = [r["curve"] for r in runs if r["method"] == m and r["curve"]]
        _draw_method(ax, curves, f"C{i % 10}", (labels or {}).get(m, m),
                     band_alpha=0.08 if many else 0.18)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    most = max([sum(r["method"] == m for r in runs) for m in methods], default=0)
    how = ("bold: mean over seeds; band: min..max over seeds; thin: each seed" if most > 1
           else "one seed per method: no band (run more seeds for one)")
    ax.set_title(f"{title}\n{how}", fontsize=9)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic: a half-written PNG is never seen
    plt.close(fig)


def _draw_method(ax, curves: list[list[list[float]]], color: str, label: str,
                 band_alpha: float) -> None:
    """One method's curves: one seed bold with its evaluations as dots; several seeds thin,
    with their mean bold and min..max shaded where every seed measured (:func:`seed_band`)."""
    if len(curves) == 1:
        c = curves[0]
        ax.plot([p[0] for p in c], [p[1] for p in c], color=color, lw=1.8, marker="o", ms=3,
                label=label)
        return
    for c in curves:
        ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.3, lw=0.6,
                marker=".", ms=2.5)
    t, mean, lo, hi = seed_band(curves)
    label += f" ({len(curves)} seeds" + (")" if len(t) else ", no common times)")
    if len(t) > 1:
        ax.fill_between(t, lo, hi, color=color, alpha=band_alpha, lw=0)
    ax.plot(t, mean, color=color, lw=1.8, label=label)


def write_results(out: Path, results: dict[str, Any]) -> None:
    """Write ``results`` to ``out/results.json`` and print its table, plot, path and total time."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(results["table"])
    print(f"\nplot: {results['plot']}\nresults: {out / 'results.json'}\n"
          f"total: {results['total_s']:.1f} s")
