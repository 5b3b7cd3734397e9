"""Band and threshold policies over reference scores; pruning once for every epoch; prune and
compact from the command line on real shards."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from conftest import payload, write_wds
from es_stream import Corpus, ESDataset, ScoreError, ScoreStore, loader, score_corpus
from es_stream.reference_policy import BandPolicy, ThresholdPolicy, rank_cut
from es_stream.manifest import read_epoch

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)


def decide(policy, scores: np.ndarray, chunk: int | None = None) -> np.ndarray:
    import es_stream.reference_policy as band
    import es_stream.policy as pol

    old = (band.CHUNK, pol.CHUNK)
    if chunk:
        band.CHUNK = pol.CHUNK = chunk
    try:
        read = lambda a, b: scores[a:b].copy()  # noqa: E731
        parts = list(policy.decide(read, len(scores), 0, 1))
    finally:
        band.CHUNK, pol.CHUNK = old
    return np.concatenate([d.keep for d in parts])


def direct(scores: np.ndarray, keep: float, band: str) -> np.ndarray:
    """The band by a full sort on (score, id): what the chunked selection must equal."""
    n = len(scores)
    k = math.ceil(keep * n)
    first = {"low": 0, "high": n - k, "middle": (n - k) // 2}[band]
    order = np.lexsort((np.arange(n), scores))
    mask = np.zeros(n, bool)
    mask[order[first:first + k]] = True
    return mask


@pytest.mark.parametrize("band", ["low", "middle", "high"])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("keep", [0.001, 0.3, 0.5, 0.999, 1.0])
def test_band_is_exact_at_every_size_and_boundary(band, n, keep):
    scores = np.random.default_rng(n).normal(size=n).astype(np.float32)
    mask = decide(BandPolicy(keep=keep, band=band), scores, chunk=64)
    assert mask.sum() == math.ceil(keep * n)
    np.testing.assert_array_equal(mask, direct(scores, keep, band))


@pytest.mark.parametrize("band", ["low", "middle", "high"])
def test_ties_are_broken_by_id_across_chunks(band):
    # three values only, so every cut falls inside a run of ties spanning many chunks
    scores = np.random.default_rng(3).integers(0, 3, 5000).astype(np.float32)
    mask = decide(BandPolicy(keep=0.37, band=band), scores, chunk=97)
    np.testing.assert_array_equal(mask, direct(scores, 0.37, band))
    const = np.full(777, 2.5, np.float32)  # all equal: the band is a run of ids
    np.testing.assert_array_equal(decide(BandPolicy(0.5, band), const, chunk=50),
                                  direct(const, 0.5, band))


def test_rank_cut_narrows_a_crowded_bin(monkeypatch):
    import es_stream.reference_policy as band

    monkeypatch.setattr(band, "_COLLECT", 10)  # force the refinement passes
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(size=300), 1e6 + rng.normal(size=3) ,
                             np.full(200, 0.25)]).astype(np.float32)
    order = np.lexsort((np.arange(len(scores)), scores))
    for r in (0, 5, 150, 250, 400, len(scores) - 1):
        value, sid = rank_cut(lambda a, b: scores[a:b], len(scores), r, chunk=64)
        assert sid == order[r] and value == scores[order[r]]


def test_threshold_keeps_the_closed_range_and_refuses_an_empty_one():
    scores = np.array([0.1, 0.5, 0.9, 0.5, 2.0], np.float32)
    np.testing.assert_array_equal(decide(ThresholdPolicy(low=0.5, high=0.9), scores),
                                  [False, True, True, True, False])
    np.testing.assert_array_equal(decide(ThresholdPolicy(high=0.5), scores),
                                  [True, True, False, True, False])
    with pytest.raises(ValueError, match="keeps no sample"):
        decide(ThresholdPolicy(low=5.0), scores)
    with pytest.raises(ValueError, match="low=2 is above high=1"):
        ThresholdPolicy(low=2, high=1)
    with pytest.raises(ValueError, match="band must be"):
        BandPolicy(0.5, "median")


def test_never_scored_and_nonfinite_are_refused_naming_the_sample():
    scores = np.linspace(0, 1, 20, dtype=np.float32)
    scored = np.ones(20, bool)
    scored[7] = False
    with pytest.raises(ScoreError, match="1 of 20 samples were never scored.*sample id 7"):
        list(BandPolicy(0.5).decide(lambda a, b: scores[a:b], 20, 0, 1,
                                    scored=lambda a, b: scored[a:b], source="ref.npy"))
    scores[3] = np.nan
    with pytest.raises(ScoreError, match="ref.npy.*sample id 3"):
        list(BandPolicy(0.5).decide(lambda a, b: scores[a:b], 20, 0, 1, source="ref.npy"))


# ---------------------------------------------------------------- prune once, end to end
@pytest.fixture
def scored(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    values = np.array([payload(i)[1] % 7 for i in range(corpus.num_samples)], np.float32)  # ties

    def score_fn(batch):
        return torch.tensor([values[int(k[6:])] for k in batch["__key__"]])

    score_corpus(corpus, score_fn, tmp_path / "ref.npy", meta_batch_size=8, num_workers=2,
                 scorer="toy", progress=False)
    return corpus, tmp_path, values


def test_cli_band_then_every_epoch_reads_it_then_compact(scored):
    corpus, tmp_path, values = scored
    result = run("prune", "--scores", str(tmp_path / "ref.npy"), "--corpus",
                 str(tmp_path / "corpus.parquet"), "--policy", "band", "--band", "middle",
                 "--keep", "0.5", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "kept 25 of 50" in result.stdout and "for every epoch" in result.stdout
    expected = np.flatnonzero(direct(values, 0.5, "middle"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["_run.json", "epoch=00000"]
    # one decision, every epoch: ESDataset (real workers) reads the same kept set in epochs 0..2
    ds = ESDataset(corpus, 4, manifests=tmp_path / "m", seed=1)
    dl = loader(ds, num_workers=2)
    for epoch in range(3):
        ds.set_epoch(epoch)
        ids = sorted(i for mb in dl for i in mb.ids.tolist())
        assert ids == expected.tolist()
    # the layout is still one hive partition that pyarrow reads
    t = pads.dataset(str(tmp_path / "m"), partitioning="hive").to_table()
    assert set(t.column("epoch").to_numpy()) == {0} and int(t.column("keep").to_numpy(
        zero_copy_only=False).sum()) == 25
    # any epoch without a directory of its own reads the all-epochs decision
    assert read_epoch(tmp_path / "m", 7, corpus.fingerprint, corpus.shard_counts).epoch == 7
    out = tmp_path / "compacted"
    result = run("compact", "--corpus", str(tmp_path / "corpus.parquet"), "--manifest",
                 str(tmp_path / "m" / "epoch=00000"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    small = Corpus.from_webdataset(str(out))
    assert small.num_samples == 25
    keys = sorted(mb_key for mb in loader(ESDataset(small, 5, shuffle=False), num_workers=0)
                  for mb_key in mb.data["__key__"])
    assert keys == [f"sample{i:06d}" for i in expected]


def test_cli_threshold_and_argument_errors(scored):
    corpus, tmp_path, values = scored
    base = ["prune", "--scores", str(tmp_path / "ref.npy"), "--corpus", str(tmp_path / "corpus.parquet")]
    result = run(*base, "--policy", "threshold", "--low", "2", "--high", "4", "--out", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    keep = read_epoch(tmp_path / "t", 3, corpus.fingerprint, corpus.shard_counts)
    assert keep.kept_ids.tolist() == np.flatnonzero((values >= 2) & (values <= 4)).tolist()
    for extra, message in [(["--policy", "band", "--keep", "0.5"], "needs --band"),
                           (["--policy", "band", "--band", "low", "--keep", "0.5", "--ratio", "0.2"],
                            "does not take --ratio"),
                           (["--policy", "threshold"], "needs --low, --high or both"),
                           (["--policy", "threshold", "--low", "100"], "keeps no sample"),
                           (["--policy", "band", "--band", "low", "--keep", "0.5", "--epoch", "2"],
                            "drop --epoch 2"),
                           (["--policy", "es"], "needs --ratio")]:
        out = tmp_path / "bad"
        result = run(*base, *extra, "--out", str(out))
        # arguments that do not go together: usage (2); scores that keep nothing: runtime (1)
        code = 1 if message == "keeps no sample" else 2
        assert result.returncode == code and message in result.stderr, (extra, result.stderr)
        assert not out.exists()
    result = run(*base, "--policy", "band", "--band", "low", "--keep", "1.5", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "argument --keep: expected a fraction in (0, 1]" in result.stderr


def test_store_of_another_corpus_is_refused_by_prune_and_its_manifests_by_compact(scored):
    corpus, tmp_path, _ = scored
    write_wds(tmp_path / "other", sizes=(25, 25))  # the same size, other shards
    other = Corpus.from_webdataset(str(tmp_path / "other"))
    other.save(tmp_path / "other.parquet")
    result = run("prune", "--scores", str(tmp_path / "ref.npy"), "--corpus",
                 str(tmp_path / "other.parquet"), "--policy", "band", "--band", "low", "--keep",
                 "0.5", "--out", str(tmp_path / "m2"))
    assert result.returncode == 1 and f"scores of corpus {corpus.fingerprint}" in result.stderr
    assert not (tmp_path / "m2").exists()
    assert run("prune", "--scores", str(tmp_path / "ref.npy"), "--corpus",
               str(tmp_path / "corpus.parquet"), "--policy", "band", "--band", "low", "--keep",
               "0.5", "--out", str(tmp_path / "m")).returncode == 0
    result = run("compact", "--corpus", str(tmp_path / "other.parquet"), "--manifest",
                 str(tmp_path / "m" / "epoch=00000"), "--out", str(tmp_path / "c"))
    assert result.returncode == 1 and f"manifest of corpus '{corpus.fingerprint}'" in result.stderr
    assert not (tmp_path / "c").exists()


def test_band_refuses_a_store_with_never_scored_samples(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    store = ScoreStore(corpus.num_samples, fingerprint=corpus.fingerprint)
    store.scatter(torch.arange(40), torch.rand(40) + 0.1)  # ids 40..49 never scored
    store.save(tmp_path / "s.npy")
    result = run("prune", "--scores", str(tmp_path / "s.npy"), "--corpus", str(tmp_path / "corpus.parquet"),
                 "--policy", "band", "--band", "high", "--keep", "0.5", "--out", str(tmp_path / "m"))
    assert result.returncode == 1 and "10 of 50 samples were never scored" in result.stderr
    assert "sample id 40" in result.stderr and not (tmp_path / "m").exists()
