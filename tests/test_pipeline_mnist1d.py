"""End to end: the MNIST-1D pipeline on a tiny corpus, through `main([...])` as `make demo` calls it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
# `pipelines` is not an installed package: make the repository root importable however pytest
# was started (`python -m pytest` adds the cwd, the `pytest` script does not)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.mnist1d.__main__ import main  # noqa: E402
from pipelines.mnist1d.data import add_label_noise, build  # noqa: E402

TRAIN, TEST, EPOCHS, b, B = 600, 200, 2, 16, 64
METHODS = ["uniform", "es", "selective_backprop"]


def expected_backprop(n: int, size: int, b: int, epochs: int) -> int:
    """Meta-batches of `size` (the last one short), b back-propagated from each; a tail of at
    most b samples is trained on whole."""
    full, tail = divmod(n, size)
    return epochs * (full * b + min(tail, b))


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_pipeline_end_to_end(tmp_path: Path, fmt: str, capsys) -> None:
    out = tmp_path / "out"
    argv = ["--methods", ",".join(METHODS), "--train", str(TRAIN), "--test", str(TEST),
            "--epochs", str(EPOCHS), "--b", str(b), "--B", str(B), "--format", fmt,
            "--workers", "0" if fmt == "wds" else "2", "--noise", "0.1", "--out", str(out),
            "--no-progress"]
    results = main(argv)
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == results["table"]
    assert [r["method"] for r in saved["runs"]] == METHODS
    table_rows = {line.split()[0] for line in results["table"].splitlines()[2:]}
    assert table_rows == set(METHODS)
    for m in METHODS:
        assert any(line.startswith(m) for line in printed.splitlines())

    runs = {r["method"]: r for r in saved["runs"]}
    for r in runs.values():
        assert r["samples_forwarded"] == TRAIN * EPOCHS  # every sample, once per epoch
        assert 0.0 <= r["final_acc"] <= 1.0 and 0.0 <= r["best_acc"] <= 1.0
        assert r["best_acc"] >= r["final_acc"]
        assert len(r["curve"]) == EPOCHS and r["wall_clock_s"] > 0
        assert [t for t, _ in r["curve"]] == sorted(t for t, _ in r["curve"])
    assert runs["uniform"]["samples_backpropagated"] == TRAIN * EPOCHS
    for m in ("es", "selective_backprop"):
        r = runs[m]
        assert r["samples_backpropagated"] < r["samples_forwarded"]
        assert r["samples_backpropagated"] == expected_backprop(TRAIN, B, b, EPOCHS)
        assert r["steps"] == EPOCHS * -(-TRAIN // B)

    png = out / "accuracy_vs_time.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in printed

    # the corpus is cached: a second build reuses it (same directory, same index)
    data = build(out / "data", TRAIN, TEST, 0.1, 42, fmt)
    assert str(data.directory) == saved["data_dir"]
    assert len(data.corpus) == TRAIN and len(data.test_y) == TEST
    assert data.test_x.shape == (TEST, 1, 40)
    # the shards hold the noisy labels, and about 10% of them differ from the clean ones
    assert saved["noisy_labels"] == int(data.noisy.sum()) == round(0.1 * TRAIN)
    assert np.array_equal(data.y != data.y_clean, data.noisy)


def test_label_noise_flips_the_requested_fraction() -> None:
    y = np.random.default_rng(0).integers(0, 10, 20000)
    for fraction in (0.0, 0.2, 0.5):
        noisy, flipped = add_label_noise(y, fraction, seed=1)
        assert abs((noisy != y).mean() - fraction) < 0.01
        assert np.array_equal(noisy != y, flipped)  # a flipped label never lands on itself
    noisy, flipped = add_label_noise(y, 0.5, seed=1)
    # the new label is uniform over the other 9 classes: the shift is uniform over 1..9
    shift = np.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert shift[0] == 0 and shift[1:].min() > 0.8 * shift[1:].mean()
    assert np.array_equal(add_label_noise(y, 0.2, seed=3)[0], add_label_noise(y, 0.2, seed=3)[0])


def test_cli_help_and_bad_method(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--preset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--methods", "uniform,nope"])
    assert exc.value.code == 2


def test_pruning_methods_skip_samples_in_the_middle_epochs(tmp_path: Path) -> None:
    epochs = 4  # eswp: epoch 0 is burn-in, epoch 3 the annealing tail; epochs 1 and 2 are pruned
    results = main(["--methods", "eswp,infobatch", "--train", str(TRAIN), "--test", str(TEST),
                    "--epochs", str(epochs), "--b", str(b), "--B", str(B), "--workers", "2",
                    "--eswp-ratio", "0.3", "--infobatch-ratio", "0.5", "--out", str(tmp_path),
                    "--no-progress"])
    runs = {r["method"]: r for r in results["runs"]}
    kept = int(np.ceil(0.7 * TRAIN))
    assert runs["eswp"]["samples_forwarded"] == 2 * TRAIN + 2 * kept
    # infobatch trains every sample it reads (batches of b) and prunes only below-mean losses
    info = runs["infobatch"]
    assert info["samples_backpropagated"] == info["samples_forwarded"]
    # at most all samples are below the mean: about half of them dropped, with binomial spread
    assert 2 * TRAIN + 2 * 0.4 * TRAIN < info["samples_forwarded"] < epochs * TRAIN
    assert all(len(r["curve"]) == epochs for r in runs.values())
