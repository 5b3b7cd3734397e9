"""The web-like corpus builder: kinds and labels, shares, determinism, the held-out split, and
duplicates that are what they claim (built from real stdlib text and binaries, read back through
es-stream from the WebDataset shards it writes)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.textlm.data import _read_all, stdlib_dir
from pipelines.webtext import KINDS, Mixture, build

SEQ = 128
KW = dict(max_bytes=400_000, min_bytes=0, seq_len=SEQ, shard_sequences=600, heldout_per_kind=16,
          log=lambda *_: None)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    data = build(tmp_path_factory.mktemp("a"), seed=3, **KW)
    return data, _read_all(data.corpus, SEQ), data.labels()


def levenshtein(a: bytes, b: bytes) -> int:
    x = np.frombuffer(a, np.uint8)
    prev = np.arange(len(b) + 1)
    for i, ca in enumerate(x, 1):
        sub = prev[:-1] + (np.frombuffer(b, np.uint8) != ca)
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, sub)
        for j in range(1, len(cur)):  # insertions run along the row
            cur[j] = min(cur[j], cur[j - 1] + 1)
        prev = cur
    return int(prev[-1])


def test_kinds_labels_and_shares(web):
    data, x, labels = web
    n = data.corpus.num_samples
    assert x.shape == (n, SEQ) and len(labels["kind"]) == n
    np.testing.assert_array_equal(labels["id"], np.arange(n))
    counts = {k: int((labels["kind"] == k).sum()) for k in KINDS}
    assert counts == Mixture().counts(n) == data.meta["counts"]
    for k, share in Mixture().shares().items():
        assert abs(counts[k] / n - share) <= 1 / n
    assert n > 1000 and data.total_train_shards > 1


def test_copies_are_exact_or_near_and_come_after_their_original(web):
    data, x, labels = web
    kind, group = labels["kind"], labels["group"]
    exact = np.flatnonzero(kind == "exact_dup")
    assert (group[exact] >= 0).all() and (group[exact] < exact).all()
    assert (x[exact] == x[group[exact]]).all()
    assert set(kind[group[exact]]) == {"clean"}
    near = np.flatnonzero(kind == "near_dup")
    assert (group[near] < near).all() and set(kind[group[near]]) == {"clean"}
    edits = data.meta["edits_per_near_dup"]
    assert edits == max(1, round(Mixture().edit_rate * SEQ))
    for i in near[:40]:
        d = levenshtein(x[i].tobytes(), x[group[i]].tobytes())
        assert 1 <= d <= 2 * edits, (i, d)
    assert (group[~np.isin(kind, ["exact_dup", "near_dup"])] == -1).all()


def test_junk_is_made_from_real_material(web):
    data, x, labels = web
    kind = labels["kind"]
    files = json.loads((data.directory / "files.json").read_text())
    lib = stdlib_dir() / "lib-dynload"
    binary = b"".join((lib / rel).read_bytes() for rel, _ in files["binary_train"])
    for i in np.flatnonzero(kind == "binary")[:20]:
        assert x[i].tobytes() in binary
    for i in np.flatnonzero(kind == "base64")[:20]:
        raw = base64.b64decode(x[i].tobytes()[:SEQ // 4 * 4])
        assert raw in binary
    for i in np.flatnonzero(kind == "html")[:20]:
        page = x[i].tobytes()
        assert b'<div class="content"><p>' in page and b"</p></div><footer>" in page
    text = b"".join((stdlib_dir() / rel).read_bytes() for rel, _ in files["train"])
    for i in np.flatnonzero(kind == "clean")[:20]:
        assert x[i].tobytes() in text
    rand = x[kind == "random"]
    assert abs(rand.mean() - 127.5) < 3  # uniform bytes


def test_heldout_never_trained_on(web):
    data, x, labels = web
    files = json.loads((data.directory / "files.json").read_text())
    train = {rel for rel, _ in files["train"]}
    assert train.isdisjoint(rel for rel, _ in files["heldout"])
    assert {r for r, _ in files["binary_train"]}.isdisjoint(r for r, _ in files["binary_heldout"])
    seen = {row.tobytes() for row in x}
    held = data.heldout.numpy()
    assert held.shape[1] == SEQ and len(held) > 10
    assert not any(row.tobytes() in seen for row in held)
    for k in ("html", "binary", "base64", "near_dup", "template", "random"):
        rows = data.heldout_kinds[k].numpy()
        assert 0 < len(rows) <= 16 and rows.shape[1] == SEQ
        assert not any(row.tobytes() in seen for row in rows), k
    # held-out exact_dup: what the model saw repeatedly (copies of trained originals)
    assert all(row.tobytes() in seen for row in data.heldout_kinds["exact_dup"].numpy())


def test_deterministic_for_a_seed(web, tmp_path):
    data, x, labels = web
    again = build(tmp_path / "b", seed=3, **KW)
    for a, b in zip(sorted((data.directory / "train").glob("*.tar")),
                    sorted((again.directory / "train").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()
    assert (data.directory / "labels.parquet").read_bytes() == \
        (again.directory / "labels.parquet").read_bytes()
    np.testing.assert_array_equal(data.heldout.numpy(), again.heldout.numpy())
    other = build(tmp_path / "c", seed=4, **KW)
    assert not np.array_equal(_read_all(other.corpus, SEQ)[:200], x[:200])


def test_mixture_is_a_parameter(tmp_path):
    mix = Mixture(clean=0.7, html=0.1, binary=0.0, base64=0.0, exact_dup=0.2, near_dup=0.0,
                  template=0.0, random=0.0, max_copies=2)
    data = build(tmp_path, mixture=mix, samples=500, seed=0, **KW)
    kinds = data.labels()["kind"]
    assert {k: int((kinds == k).sum()) for k in KINDS} == mix.counts(500)
    with pytest.raises(ValueError, match="add up to 1"):
        Mixture(clean=0.5)
    with pytest.raises(ValueError, match="need more material"):
        build(tmp_path / "big", samples=10 ** 7, **KW)
