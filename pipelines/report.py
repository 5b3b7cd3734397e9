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


def plot_curves(runs: list[dict[str, Any]], methods: list[str], path: Path, title: str,
                ylabel: str) -> None:
    """Each run's ``curve`` (quality against training wall-clock), one colour per method, one
    line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(methods):
        for j, r in enumerate(rs for rs in runs if rs["method"] == m):
            t, q = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(t, q, marker="o", ms=3, color=f"C{i}", alpha=0.9 if j == 0 else 0.5,
                    label=m if j == 0 else None)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, results: dict[str, Any]) -> None:
    """Write ``results`` to ``out/results.json`` and print its table, plot, path and total time."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(results["table"])
    print(f"\nplot: {results['plot']}\nresults: {out / 'results.json'}\n"
          f"total: {results['total_s']:.1f} s")
