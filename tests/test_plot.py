"""The pure helpers behind ``es-stream inspect --plot`` (es_stream.plot) and the seed bands of
the training-curve plots (pipelines.report.seed_band): numbers in, numbers out, no image."""

from __future__ import annotations

import numpy as np
import pytest

from es_stream.plot import Phases, histogram_epoch, integer_ticks, log_bins, pruning_phases


def test_phases_burn_in_from_epoch_zero_and_annealing_tail():
    # a run with burn_in_epochs=2 over 8 epochs, annealing 2: manifests for epochs 1..7
    counts = {1: 0, 2: 10, 3: 12, 4: 9, 5: 11, 6: 0, 7: 0}
    assert pruning_phases(counts) == Phases((0, 2), (6, 8), (2, 3, 4, 5))


def test_phases_with_nothing_pruned_and_a_decision_for_every_epoch():
    assert pruning_phases({1: 0, 2: 0}) == Phases((0, 0), (3, 3), ())
    # `prune --policy band`: epoch 0 only, applies to all -- no burn-in before it
    assert pruning_phases({0: 7}, missing_keeps_all=False) == Phases((0, 0), (1, 1), (0,))
    # a pruned epoch in the middle of keep-all ones is not annealing: only the tail is
    assert pruning_phases({3: 4, 4: 0, 5: 2, 6: 0}).annealing == (6, 7)
    with pytest.raises(ValueError, match="at least one epoch"):
        pruning_phases({})


def test_histogram_epoch_defaults_to_the_last_that_pruned():
    assert histogram_epoch([1, 2, 3, 4], pruned=[2, 3], requested=None) == 3
    assert histogram_epoch([1, 2], pruned=[], requested=None) == 2
    assert histogram_epoch([1, 2, 3], pruned=[2], requested=1) == 1
    with pytest.raises(ValueError, match=r"--epoch 9: .*epochs with one: 1-3, 5"):
        histogram_epoch([1, 2, 3, 5], pruned=[2], requested=9)


def test_log_bins_span_the_positive_scores_and_count_the_rest():
    scores = np.array([1e-4, 3e-2, 0.0, 2.5, np.nan, 0.7], np.float32)
    edges, excluded = log_bins(scores, bins=10)
    assert excluded == 2 and len(edges) == 11
    assert edges[0] == pytest.approx(1e-4) and edges[-1] == pytest.approx(2.5)
    ratios = edges[1:] / edges[:-1]
    assert np.allclose(ratios, ratios[0])  # equal widths on a log axis
    edges, _ = log_bins(np.full(5, 0.5))  # one value: a decade around it, not a zero width
    assert edges[0] < 0.5 < edges[-1]
    edges, excluded = log_bins(np.zeros(4))
    assert edges.size == 0 and excluded == 4


@pytest.mark.parametrize("first,last,max_ticks,expected", [
    (0, 7, 12, list(range(8))),
    (0, 30, 12, list(range(0, 31, 5))),
    (1, 40, 12, [5, 10, 15, 20, 25, 30, 35, 40]),
    (3, 3, 12, [3]),
    (0, 1000, 6, [0, 200, 400, 600, 800, 1000]),
])
def test_integer_ticks(first, last, max_ticks, expected):
    ticks = integer_ticks(first, last, max_ticks)
    assert ticks == expected
    assert all(isinstance(t, int) for t in ticks) and len(ticks) <= max_ticks


# --- seed bands of the training curves -------------------------------------------------------

from pipelines.report import seed_band  # noqa: E402


def test_seed_band_interpolates_seeds_onto_one_grid():
    # seeds evaluated at different wall-clock times: the band needs a common grid
    a = [[1.0, 0.2], [3.0, 0.6], [5.0, 0.8]]
    b = [[2.0, 0.3], [4.0, 0.5], [6.0, 0.9]]
    t, mean, lo, hi = seed_band([a, b], points=5)
    assert t[0] == 2.0 and t[-1] == 5.0  # only where every seed has measured: no extrapolation
    qa, qb = np.interp(t, [1, 3, 5], [0.2, 0.6, 0.8]), np.interp(t, [2, 4, 6], [0.3, 0.5, 0.9])
    assert np.allclose(mean, (qa + qb) / 2)
    assert np.allclose(lo, np.minimum(qa, qb)) and np.allclose(hi, np.maximum(qa, qb))


def test_seed_band_of_one_seed_or_no_overlap():
    t, mean, lo, hi = seed_band([[[0.0, 1.0], [2.0, 3.0]]], points=3)
    assert np.allclose(t, [0, 1, 2]) and np.allclose(mean, [1, 2, 3]) and np.allclose(lo, hi)
    # the seeds' time ranges do not overlap: nothing common to draw
    t, *_ = seed_band([[[0.0, 1.0], [1.0, 2.0]], [[5.0, 1.0], [6.0, 2.0]]])
    assert t.size == 0


def test_figure_format_follows_the_extension_and_refuses_what_cannot_be_recognised():
    from es_stream.plot import FIGURE_FORMATS, figure_format

    assert figure_format("a/b.PNG") == "png" and figure_format("plot") == "png"
    assert figure_format("x.pdf") == "pdf" and figure_format("x.jpeg") == "jpeg"
    for ext in ("gif", "svgz", "tif", "webp"):   # no uncompressed place for the marker
        assert ext not in FIGURE_FORMATS
        with pytest.raises(ValueError, match=rf"x\.{ext}: figures are written as .*not \.{ext}"):
            figure_format(f"x.{ext}")


def test_phases_with_a_known_burn_in_tell_it_from_no_decision_yet():
    # InfoBatch (no burn-in) over 4 epochs: manifests for 1..3, epoch 3 anneals. Its epoch 0
    # pruned nothing because no decision existed yet, not because of a burn-in.
    counts = {1: 5, 2: 6, 3: 0}
    assert pruning_phases(counts, burn_in_epochs=0) == Phases((0, 0), (3, 4), (1, 2), undecided=(0, 1))
    # ESWP with burn_in_epochs=2: epochs 0 and 1 are burn-in, nothing left undecided
    assert pruning_phases({1: 0, 2: 4, 3: 0}, burn_in_epochs=2) == Phases((0, 2), (3, 4), (2,))
    # burn_in_epochs=1 and a first pruning at epoch 2 (epoch 1's decision kept all): 1 undecided
    assert pruning_phases({1: 0, 2: 4}, burn_in_epochs=1).undecided == (1, 2)
    # unknown burn-in (manifests without a run record): as before, everything before is burn-in
    assert pruning_phases(counts) == Phases((0, 1), (3, 4), (1, 2))
