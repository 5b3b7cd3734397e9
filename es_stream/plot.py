"""Pure helpers behind ``es-stream inspect --plot``: which epochs pruned (burn-in and annealing
around them), which epoch's scores to draw, log-spaced score bins and integer epoch ticks.

They take and return plain numbers and arrays, so they are tested without drawing anything;
matplotlib (an optional dependency) is imported only by :func:`plot_manifests`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .atomic import atomic_write
from .errors import MissingExtraError, naming


@dataclass(frozen=True)
class Phases:
    """The epochs ``0 .. last`` split by what the manifests did.

    ``burn_in`` and ``annealing`` are half-open ranges ``(start, stop)`` of epochs that pruned
    nothing before the first and after the last epoch that pruned (empty: ``start == stop``);
    ``pruned`` lists the epochs that pruned at least one sample, ascending. ``undecided``: the
    epochs after burn-in and before the first that pruned, which pruned nothing because no
    decision had been made yet (epoch 0 of a run deciding at each epoch end, e.g. InfoBatch,
    which has no burn-in); empty unless the run's ``burn_in_epochs`` is known.
    """

    burn_in: tuple[int, int]
    annealing: tuple[int, int]
    pruned: tuple[int, ...]
    undecided: tuple[int, int] = (0, 0)


def pruning_phases(pruned_counts: Mapping[int, int], *, missing_keeps_all: bool = True,
                   burn_in_epochs: int | None = None) -> Phases:
    """Burn-in, pruning and annealing epochs from each manifest epoch's count of pruned samples.

    An epoch with no manifest directory keeps every sample (that is what the loader does), so
    with ``missing_keeps_all`` the epochs from 0 up to the first manifest count as pruning
    nothing. Which of them are burn-in is the run's ``burn_in_epochs`` (from its run record):
    epochs before it are burn-in, the rest before the first pruning epoch are ``undecided``
    (InfoBatch's epoch 0: no burn-in, just no decision yet). Unknown (None: manifests without a
    run record), all of them count as burn-in. Pass ``missing_keeps_all=False`` for a decision
    that ``applies_to: all`` epochs (``es-stream prune --policy band``), where a missing epoch
    means epoch 0's decision. When no epoch pruned, there is no burn-in or annealing to show:
    both ranges are empty.
    """
    if not pruned_counts:
        raise ValueError("pruning_phases needs at least one epoch's count of pruned samples")
    if any(e < 0 for e in pruned_counts):
        raise ValueError(f"epochs must be >= 0, got {sorted(pruned_counts)}")
    first, last = (0 if missing_keeps_all else min(pruned_counts)), max(pruned_counts)
    pruned = tuple(sorted(e for e, n in pruned_counts.items() if n > 0))
    if not pruned:
        return Phases((first, first), (last + 1, last + 1), ())
    annealing = (pruned[-1] + 1, last + 1)
    if burn_in_epochs is None or not missing_keeps_all:
        return Phases((first, pruned[0]), annealing, pruned)
    stop = max(first, min(burn_in_epochs, pruned[0]))
    undecided = (stop, pruned[0]) if pruned[0] > stop else (0, 0)
    return Phases((first, stop), annealing, pruned, undecided=undecided)


def histogram_epoch(epochs: Sequence[int], pruned: Sequence[int], requested: int | None) -> int:
    """The epoch whose score histogram to draw: ``requested`` (``--epoch``) when given, which
    must be one of ``epochs``; else the last epoch that pruned anything (the one whose
    kept/pruned split is informative); else the last epoch."""
    if not epochs:
        raise ValueError("no epochs to choose from")
    if requested is not None:
        if requested not in epochs:
            raise ValueError(f"--epoch {requested}: no finished manifest for that epoch; "
                             f"epochs with one: {_ranges(sorted(epochs))}")
        return requested
    return max(pruned) if pruned else max(epochs)


def _ranges(values: Sequence[int]) -> str:
    """``0-3, 5, 7-9`` for [0, 1, 2, 3, 5, 7, 8, 9]: short even for a thousand epochs."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ", ".join(out)


def log_bins(scores: np.ndarray, bins: int = 50) -> tuple[np.ndarray, int]:
    """Log-spaced histogram edges over the positive finite ``scores``, and how many scores a log
    axis cannot show (zero, negative or not finite), which the caller must report, not drop
    silently. Losses span decades (a learned sample's loss is 1e-4, a hard one's 5), so linear
    bins put nearly every sample in the first bin. All scores equal: one decade around them.
    No positive score at all: ``(empty array, count)``."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    scores = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(scores) & (scores > 0)
    excluded = int(scores.size - ok.sum())
    if not ok.any():
        return np.empty(0), excluded
    lo, hi = float(scores[ok].min()), float(scores[ok].max())
    if lo == hi:
        lo, hi = lo / math.sqrt(10), hi * math.sqrt(10)
    return np.geomspace(lo, hi, bins + 1), excluded


def integer_ticks(first: int, last: int, max_ticks: int = 12) -> list[int]:
    """At most ``max_ticks`` integer ticks from ``first`` to ``last``, on a step of 1, 2, 5,
    10, 20, 50, ... (an epoch 2.5 does not exist, so an epoch axis never shows one)."""
    if last < first:
        raise ValueError(f"last ({last}) < first ({first})")
    if max_ticks < 2:
        raise ValueError(f"max_ticks must be >= 2, got {max_ticks}")
    span, step, k = last - first, 1, 0
    while span // step + 1 > max_ticks:
        k += 1
        step = (1, 2, 5)[k % 3] * 10 ** (k // 3)
    start = -(-first // step) * step  # the first multiple of step at or after first
    return list(range(start, last + 1, step))


def plot_manifests(path: str, epochs: Sequence[int], kept_fraction: Mapping[int, float],
                   per_shard: Mapping[int, Sequence[float]], phases: Phases, hist_epoch: int,
                   kept_scores: np.ndarray, pruned_scores: np.ndarray, *,
                   missing_keeps_all: bool = True) -> int:
    """Write the three views of ``es-stream inspect --plot`` to ``path`` (PNG): kept fraction
    per epoch (burn-in and annealing shaded), kept fraction per epoch and shard (a heat map,
    readable for any number of epochs), and the scores of ``hist_epoch``, kept against pruned,
    on a log axis. Returns how many scores the log axis could not show (zero or negative)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    last = max(epochs)
    _kept_per_epoch(axes[0], epochs, kept_fraction, phases, last, missing_keeps_all)
    _kept_per_shard(fig, axes[1], epochs, per_shard)
    excluded = _score_histogram(axes[2], hist_epoch, kept_scores, pruned_scores)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return excluded


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; :class:`MissingExtraError` naming the
    ``[plot]`` extra when matplotlib is not installed (call it before any work is done)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("es-stream inspect --plot", "plot", "matplotlib") from exc
    return plt


#: written into every figure's metadata (PNG ``Software``, PDF/SVG/PS ``Creator``, a JPEG
#: comment), so that ``es-stream inspect --plot`` can tell a figure it wrote, which it may
#: replace, from anything else at that path, which it refuses to overwrite
FIGURE_MARKER = "es-stream figure"
#: the formats whose files carry the marker uncompressed: :func:`save_figure` writes only these
FIGURE_FORMATS = ("png", "pdf", "svg", "ps", "eps", "jpg", "jpeg")


def figure_format(path: str | os.PathLike) -> str:
    """The format :func:`save_figure` writes ``path`` in: its extension, PNG when there is none;
    ValueError naming the path for a format outside :data:`FIGURE_FORMATS`."""
    fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"{os.fspath(path)}: figures are written as "
                         f"{', '.join('.' + f for f in FIGURE_FORMATS)}; not .{fmt}")
    return fmt


def save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """``fig.savefig`` through :func:`es_stream.atomic.atomic_write`: a reader (an image
    viewer, a docs build) never sees half a PNG; the format follows the extension
    (:func:`figure_format`). The file carries :data:`FIGURE_MARKER` in its metadata."""
    fmt = figure_format(path)
    if fmt in ("jpg", "jpeg"):  # matplotlib has no JPEG metadata; Pillow writes a comment
        marked = {"pil_kwargs": {"comment": FIGURE_MARKER.encode()}}
    else:
        marked = {"metadata": {"Software" if fmt == "png" else "Creator": FIGURE_MARKER}}
    with naming(path), atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt, **marked)


def is_es_stream_figure(path: str | os.PathLike, limit: int = 64 << 20) -> bool:
    """Whether ``path`` is a file :func:`save_figure` wrote: it carries :data:`FIGURE_MARKER`
    (kept uncompressed by PNG, PDF, SVG and PostScript metadata and a JPEG comment). False for a missing path, a
    directory, or a file over ``limit`` bytes (no figure of ours is that large)."""
    if not os.path.isfile(path) or os.path.getsize(path) > limit:
        return False
    with open(path, "rb") as f:
        return FIGURE_MARKER.encode() in f.read()


def _kept_per_epoch(ax, epochs, kept_fraction, phases: Phases, last: int,
                    missing_keeps_all: bool) -> None:
    first = phases.burn_in[0]
    for (a, b), colour, name in ((phases.burn_in, "tab:orange", "burn-in (nothing pruned)"),
                                 (phases.undecided, "tab:gray", "no decision yet (nothing pruned)"),
                                 (phases.annealing, "tab:green", "annealing (nothing pruned)")):
        if b > a:  # epoch e covers [e - 0.5, e + 0.5] on the axis
            ax.axvspan(a - 0.5, b - 0.5, color=colour, alpha=0.15, label=name)
    missing = [e for e in range(first, last + 1) if e not in kept_fraction]
    ax.plot(epochs, [kept_fraction[e] for e in epochs], marker="o", color="tab:blue",
            label="kept fraction (manifest)")
    if missing and missing_keeps_all:  # (with applies_to: all, epoch 0's decision holds)
        ax.plot(missing, [1.0] * len(missing), "o", mfc="none", color="tab:blue",
                label="no manifest: keeps all")
    ticks = integer_ticks(first, last)
    ax.set_xticks(ticks)
    ax.set_xlim(first - 0.5, last + 0.5)
    title = "kept fraction per epoch" + ("" if missing_keeps_all else
                                         "\n(epoch 0's decision holds for every epoch)")
    ax.set(title=title, xlabel="epoch", ylabel="kept fraction", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")


def _kept_per_shard(fig, ax, epochs, per_shard) -> None:
    shards = max(len(per_shard[e]) for e in epochs)
    grid = np.full((len(epochs), shards), np.nan)
    for i, e in enumerate(epochs):
        grid[i, :len(per_shard[e])] = per_shard[e]
    im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                   interpolation="nearest")
    rows = integer_ticks(0, len(epochs) - 1)
    ax.set_yticks(rows, [str(epochs[i]) for i in rows])
    ax.set_xticks(integer_ticks(0, shards - 1))
    ax.set(title="kept fraction per epoch and shard", xlabel="shard", ylabel="epoch")
    fig.colorbar(im, ax=ax, label="kept fraction")


def _score_histogram(ax, epoch: int, kept: np.ndarray, pruned: np.ndarray) -> int:
    from matplotlib.ticker import MaxNLocator

    scores = np.concatenate([kept, pruned])
    # ~2 sqrt(n) bins, 10..60: 50 bins over 50 samples would show noise, not a distribution
    edges, excluded = log_bins(scores, bins=int(np.clip(2 * np.sqrt(scores.size), 10, 60)))
    title = f"scores of epoch {epoch}"
    if excluded:
        title += f" ({excluded} zero or negative, not shown)"
    if edges.size:
        for values, name, colour in ((kept, "kept", "tab:blue"), (pruned, "pruned", "tab:red")):
            ax.hist(values, bins=edges, alpha=0.6, color=colour,
                    label=f"{name} ({len(values)})")
        ax.set_xscale("log")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # sample counts
        ax.legend(fontsize="small")
    ax.set(title=title, xlabel="score (loss, log scale)", ylabel="samples")
    return excluded
