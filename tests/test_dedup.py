"""Dedup against brute force on a small real web-like corpus (stdlib text and binaries written
as WebDataset shards), its manifests read by ESDataset and compact, and the CLI."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from es_stream import Corpus, ESDataset, ScoreStore, loader
from es_stream.reference_policy import ThresholdPolicy
from es_stream.dedup import (REASONS, DedupConfig, MinHasher, content_digests, corpus_dedup,
                             decide, exact_groups, similarity, write_manifests)
from es_stream.pruner import Pruner
from pipelines.textlm.data import _read_all
from pipelines.webtext import build

SEQ = 128


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    data = build(tmp_path_factory.mktemp("web"), max_bytes=400_000, min_bytes=0, seq_len=SEQ,
                 shard_sequences=700, heldout_per_kind=8, log=lambda *_: None)
    samples = [row.tobytes() for row in _read_all(data.corpus, SEQ)]
    return data, samples


def brute_first_copy(samples: list[bytes], eligible: np.ndarray) -> np.ndarray:
    """For each sample, the first eligible sample with the same bytes (-1: none), pairwise."""
    out = np.full(len(samples), -1, np.int64)
    for i, s in enumerate(samples):
        for j in range(len(samples)):
            if eligible[j] and samples[j] == s:
                out[i] = j
                break
    return out


def test_exact_finds_every_duplicate_and_nothing_else(web):
    data, samples = web
    small = samples[:1500]  # pairwise is quadratic: a prefix still holds hundreds of copies
    rng = np.random.default_rng(1)
    for eligible in (np.ones(len(small), bool), rng.random(len(small)) < 0.7):
        got = exact_groups(content_digests(small), eligible)
        want = brute_first_copy(small, eligible)
        np.testing.assert_array_equal(got, want)
    dups = int((exact_groups(content_digests(small)) != np.arange(len(small))).sum())
    assert dups > 50, "the prefix should hold exact copies to find"


def shingle_sets(samples: list[bytes], k: int = 5) -> list[set[bytes]]:
    return [{s[i:i + k] for i in range(len(s) - k + 1)} for s in samples]


def brute_jaccard(samples: list[bytes]) -> np.ndarray:
    sets = shingle_sets(samples)
    n = len(sets)
    out = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(i):
            inter = len(sets[i] & sets[j])
            if inter:
                out[i, j] = out[j, i] = inter / (len(sets[i]) + len(sets[j]) - inter)
    return out


def test_near_recall_and_precision_against_brute_force_jaccard(web):
    data, samples = web
    small = samples[:1200]
    config = DedupConfig(near=True)
    sig = MinHasher().signatures(small)
    result = decide(content_digests(small), sig, config=config)
    jac = brute_jaccard(small)
    exact = result.reason == REASONS.index("exact_dup")
    lower = np.tril(jac, -1)
    truth = (lower >= config.threshold).any(axis=1) & ~exact  # an earlier similar sample
    near = result.reason == REASONS.index("near_dup")
    recall = (near & truth).sum() / max(1, truth.sum())
    similar_to_any = (jac >= config.threshold).any(axis=1)
    precision = (near & similar_to_any).sum() / max(1, near.sum())
    loose = (near & (jac >= config.threshold - 0.1).any(axis=1)).sum() / max(1, near.sum())
    i, j = np.nonzero(lower > 0.3)
    err = np.abs(similarity(sig, i, j) - lower[i, j])
    print(f"\nnear dup at Jaccard {config.threshold}: {int(truth.sum())} true, {int(near.sum())} "
          f"found; recall {recall:.3f}, precision {precision:.3f} (at {config.threshold - 0.1:.1f}: "
          f"{loose:.3f}); MinHash |error| mean {err.mean():.4f}, max {err.max():.3f} over {len(i)} pairs")
    assert truth.sum() > 50
    assert recall >= 0.85 and precision >= 0.85 and loose >= 0.97
    # pairs here share boilerplate, so their errors are correlated: a loose bound; the
    # estimator's accuracy on independent pairs is checked below
    assert err.mean() < 0.08
    # the kept sample of a group is its first by id, and kept samples are never similar pairs
    assert (result.duplicate_of[near] < np.flatnonzero(near)).all()


def kept_ids_read(corpus: Corpus, manifests: Path, epoch: int) -> list[int]:
    ds = ESDataset(corpus, meta_batch_size=97, decode=lambda s: s["bin"], collate=list,
                   shuffle=False, manifests=manifests)
    ds.set_epoch(epoch)
    return sorted(int(i) for mb in loader(ds, num_workers=2) for i in mb.ids)


def test_manifests_read_by_esdataset_every_epoch_and_by_compact(web, tmp_path):
    data, samples = web
    config = DedupConfig(near=True)
    result = corpus_dedup(data.corpus, config, num_workers=2)
    out = write_manifests(data.corpus, result, tmp_path / "m", config)
    kept = np.flatnonzero(result.keep)
    assert 0 < len(kept) < data.corpus.num_samples
    for epoch in (0, 3):  # written once as epoch 0, it holds for every epoch
        assert kept_ids_read(data.corpus, tmp_path / "m", epoch) == kept.tolist()
    table = pads.dataset(tmp_path / "m", partitioning="hive").to_table().sort_by("id")
    assert table.column("reason").to_pylist() == [REASONS[c] for c in result.reason]
    np.testing.assert_array_equal(table.column("duplicate_of").to_numpy(), result.duplicate_of)
    first = sorted(os.listdir(out))
    before = {f: (Path(out) / f).read_bytes() for f in first if f.endswith(".parquet")}
    write_manifests(data.corpus, result, tmp_path / "m", config)  # a rerun: the same bytes
    assert {f: (Path(out) / f).read_bytes() for f in before} == before
    r = run_cli("compact", "--corpus", str(data.directory / f"train-k{data.train_shards}.parquet"),
                "--manifest", out, "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    compacted = Corpus.from_webdataset(sorted(str(p) for p in (tmp_path / "c").glob("*.tar")))
    got = [row.tobytes() for row in _read_all(compacted, SEQ)]
    assert got == [samples[i] for i in kept]
    assert len(set(got)) == len(got)  # no exact duplicate survives


def test_combined_with_a_threshold_filter(web, tmp_path):
    data, samples = web
    corpus = data.corpus
    n = corpus.num_samples
    # a filter that drops the first copy of some duplicated samples: the next copy is kept
    digests = content_digests(samples)
    first = exact_groups(digests)
    ids = np.arange(n)
    originals = np.unique(first[first != ids])
    scores = np.random.default_rng(0).random(n).astype(np.float32) * 0.5
    scores[originals[::2]] = 1.0  # filtered out below
    store = ScoreStore(n, fingerprint=corpus.fingerprint)
    store.scatter(torch.arange(n), torch.from_numpy(scores))
    Pruner(corpus, store, ThresholdPolicy(high=0.9), tmp_path / "filter").write(0, 1)
    result = corpus_dedup(corpus, DedupConfig(), filter_dir=tmp_path / "filter")
    eligible = scores <= 0.9
    assert (result.reason[~eligible] == REASONS.index("filtered")).all()
    np.testing.assert_array_equal(result.keep, eligible & (exact_groups(digests, eligible) == ids))
    # a duplicated document whose first copy was filtered is still kept once
    for o in originals[::2][:20]:
        copies = np.flatnonzero(first == o)
        assert result.keep[copies].sum() == (1 if eligible[copies].any() else 0)
    write_manifests(corpus, result, tmp_path / "both", filter_dir=tmp_path / "filter")
    assert kept_ids_read(corpus, tmp_path / "both", 0) == np.flatnonzero(result.keep).tolist()
    with pytest.raises(ValueError, match="would replace the filter"):
        write_manifests(corpus, result, tmp_path / "filter", filter_dir=tmp_path / "filter")


def test_minhash_estimates_jaccard_like_the_theory():
    rng = np.random.default_rng(5)
    base = [rng.integers(0, 256, 256, dtype=np.uint8) for _ in range(400)]
    edited = []
    for b in base:  # independent pairs at similarities spread over (0, 1)
        x = b.copy()
        x[rng.integers(0, 256, int(rng.integers(1, 60)))] = rng.integers(0, 256, 256)[:1]
        edited.append(x)
    a, b = [x.tobytes() for x in base], [x.tobytes() for x in edited]
    sets = shingle_sets(a + b)
    jac = np.array([len(sets[i] & sets[400 + i]) / len(sets[i] | sets[400 + i]) for i in range(400)])
    sig = MinHasher().signatures(a + b)
    err = similarity(sig, np.arange(400), np.arange(400, 800)) - jac
    theory = np.mean(np.sqrt(jac * (1 - jac) / 128)) * np.sqrt(2 / np.pi)  # mean |N(0, s)|
    print(f"\nMinHash error on independent pairs: bias {err.mean():+.4f}, mean |error| "
          f"{np.abs(err).mean():.4f} (theory {theory:.4f})")
    assert abs(err.mean()) < 0.01 and np.abs(err).mean() < 1.25 * theory


def test_minhasher_short_and_empty_samples():
    sig = MinHasher(num_perm=16).signatures([b"", b"ab", b"ab", b"abcdefgh", b""])
    assert (sig[0] == 0xFFFFFFFF).all() and (sig[0] == sig[4]).all()
    assert (sig[1] == sig[2]).all() and not (sig[1] == sig[3]).all()
    res = decide(content_digests([b"", b"x", b""]), MinHasher(num_perm=16).signatures(
        [b"", b"x", b""]), config=DedupConfig(near=True, num_perm=16, bands=4))
    assert res.reason.tolist() == [0, 0, 1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "es_stream.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_dedup(web, tmp_path):
    data, samples = web
    index = str(data.directory / f"train-k{data.train_shards}.parquet")
    r = run_cli("dedup", "--corpus", index, "--manifests", str(tmp_path / "m"), "--near",
                "--threshold", "0.8", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "exact_dup" in r.stdout and "near_dup" in r.stdout and "for every epoch" in r.stdout
    expected = corpus_dedup(data.corpus, DedupConfig(near=True), num_workers=0)
    assert kept_ids_read(data.corpus, tmp_path / "m", 1) == np.flatnonzero(expected.keep).tolist()
    bad = run_cli("dedup", "--corpus", index, "--manifests", str(tmp_path / "x"), "--near",
                  "--bands", "3")
    assert bad.returncode == 1 and "bands (3) must divide num_perm (128)" in bad.stderr
    (tmp_path / "file").write_text("mine")
    bad = run_cli("dedup", "--corpus", index, "--manifests", str(tmp_path / "file"))
    assert bad.returncode == 1 and "is a file" in bad.stderr
    assert (tmp_path / "file").read_text() == "mine"


def test_bench_dedup_runs_and_agrees_with_its_baselines(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_dedup

    bench_dedup.main(["--out", str(tmp_path), "--samples", "3000", "--baseline-samples", "300",
                      "--repeats", "1"])
    out = capsys.readouterr().out
    assert "exact  baseline  (python dict of bytes)" in out and "(same decision" in out
    assert re.search(r"near   es-stream .*: +[\d,]+ samples/s", out)
    assert re.search(r"goals \(one core, CPU time\): exact [\d,]+ >= 200,000 samples/s: (yes|NO)", out)
    if importlib.util.find_spec("datasketch"):
        agree = float(re.search(r"same decision on ([\d.]+)% of samples", out).group(1))
        assert agree >= 95.0, out


def test_cli_dedup_on_two_gloo_ranks_matches_one_process(web, tmp_path):
    """`es-stream dedup` under a torchrun-like environment (2 real gloo processes): each rank
    reads its part, rank 0 writes, and the manifests are byte-identical to one process's."""
    import socket

    data, _ = web
    index = str(data.directory / f"train-k{data.train_shards}.parquet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "es_stream.cli", "dedup", "--corpus", index, "--manifests",
            str(tmp_path / "two"), "--near", "--workers", "1"]
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "dedup: kept" in outs[0][0] and outs[1][0] == ""  # rank 0 reports and writes
    one = run_cli("dedup", "--corpus", index, "--manifests", str(tmp_path / "one"), "--near")
    assert one.returncode == 0, one.stderr
    files = sorted(p.name for p in (tmp_path / "one" / "epoch=00000").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two" / "epoch=00000").iterdir())
    for name in files:
        assert (tmp_path / "one" / "epoch=00000" / name).read_bytes() == \
            (tmp_path / "two" / "epoch=00000" / name).read_bytes(), name


def test_exact_dedup_of_an_mds_corpus_by_field(tmp_path):
    """MDS shards (typed columns) through the same path: ``field`` picks the column, numbers
    and strings hash by value."""
    streaming = pytest.importorskip("streaming")
    payloads = [os.urandom(40) for _ in range(15)]
    with streaming.MDSWriter(out=str(tmp_path / "mds"), columns={"bin": "bytes", "idx": "int",
                                                                 "txt": "str"},
                             size_limit=1 << 10) as w:
        for i in range(60):
            w.write({"bin": payloads[i % 15], "idx": i, "txt": f"t{i % 30}"})
    corpus = Corpus.from_mds(str(tmp_path / "mds"))
    assert corpus.num_shards > 1
    by_bin = corpus_dedup(corpus, DedupConfig(), field="bin", num_workers=0)
    assert np.flatnonzero(by_bin.keep).tolist() == list(range(15))
    assert by_bin.duplicate_of[15:].tolist() == [i % 15 for i in range(15, 60)]
    by_txt = corpus_dedup(corpus, DedupConfig(), field="txt", num_workers=0)
    assert np.flatnonzero(by_txt.keep).tolist() == list(range(30))
    whole = corpus_dedup(corpus, DedupConfig(), num_workers=0)  # idx differs: all kept
    assert whole.keep.all()
    write_manifests(corpus, by_bin, tmp_path / "m")
    ds = ESDataset(corpus, meta_batch_size=16, collate=list, shuffle=False, manifests=tmp_path / "m")
    assert sorted(int(i) for mb in loader(ds, num_workers=0) for i in mb.ids) == list(range(15))
