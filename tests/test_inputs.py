"""Conventional inputs a webdataset / mosaicml-streaming user brings: webdataset's decoder
shorthands, streaming's ``remote=``/``local=`` keywords, ``file:`` URLs, a directory holding
shards es-stream cannot read, MDS ndarray columns."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import es_stream as es
from conftest import payload, write_wds

SIZE = (6, 4)  # PIL (width, height)


def _image(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_shards(tmp_path: Path) -> list[str]:
    paths = []
    for s, count in enumerate((5, 7)):
        path = str(tmp_path / "img" / f"img-{s:06d}.tar")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with wds.TarWriter(path) as w:
            for j in range(count):
                i = 10 * s + j
                w.write({"__key__": f"s{i:04d}", "jpg": _image(i, "JPEG"), "png": _image(i, "PNG"),
                         "cls": i % 3})
        paths.append(path)
    return paths


def _webdataset_reference(paths: list[str], spec: str) -> dict[str, dict]:
    """What ``wds.WebDataset(paths).decode(spec)`` gives, by key."""
    pipeline = wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode(spec)
    return {s["__key__"]: s for s in pipeline}


def _same(a, b) -> bool:
    if isinstance(a, Image.Image):
        return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec", ["pil", "rgb", "torchrgb", "l8"])
def test_decode_shorthand_decodes_real_jpeg_and_png_as_webdataset_does(image_shards, spec):
    corpus = es.Corpus.from_webdataset(image_shards)
    dataset = es.ESDataset(corpus, meta_batch_size=4, decode=spec, shuffle=False)
    reference = _webdataset_reference(image_shards, spec)
    got = 0
    for mb in es.loader(dataset, num_workers=2):
        for field in ("jpg", "png"):
            column = mb.data[field]
            for i, key in enumerate(mb.data["__key__"]):
                value = column[i]
                expected = reference[key][field]
                if spec == "pil":  # images cannot be stacked: a list, as webdataset keeps them
                    assert isinstance(column, list) and isinstance(value, Image.Image)
                else:
                    assert isinstance(column, torch.Tensor)
                assert _same(value, expected), (spec, key, field)
        assert torch.equal(mb.data["cls"], torch.tensor([reference[k]["cls"] for k in mb.data["__key__"]]))
        got += len(mb)
    assert got == corpus.num_samples == len(reference)


def test_decode_list_of_specs_and_handlers(image_shards):
    def upper_cls(key, data):  # a webdataset handler: (key, data) -> value, None to pass
        return b"X" + data if key.endswith(".cls") else None

    dataset = es.ESDataset(es.Corpus.from_webdataset(image_shards), 12, shuffle=False,
                           decode=["torchrgb8", upper_cls], collate=list)
    samples = next(iter(dataset)).data
    assert all(s["jpg"].dtype == torch.uint8 and s["jpg"].shape == (3, SIZE[1], SIZE[0]) for s in samples)
    assert all(s["cls"].startswith(b"X") for s in samples)  # the handler ran before the defaults


def test_bad_decode_and_collate_are_refused_at_construction(wds_dir):
    corpus = es.Corpus.from_webdataset(wds_dir)
    with pytest.raises(ValueError, match=r"decode='jpeg-please'.*'pil'.*'torchrgb'"):
        es.ESDataset(corpus, 4, decode="jpeg-please")
    with pytest.raises(TypeError, match="decode must be a function.*int 3"):
        es.ESDataset(corpus, 4, decode=3)
    with pytest.raises(TypeError, match="decode: a handler.*dict"):
        es.ESDataset(corpus, 4, decode=["pil", {}])
    with pytest.raises(TypeError, match="collate must be a function"):
        es.ESDataset(corpus, 4, collate="stack")


def _all_samples(corpus: es.Corpus) -> dict[int, dict]:
    dataset = es.ESDataset(corpus, 16, shuffle=False, collate=list)
    return {int(i): s for mb in dataset for i, s in zip(mb.ids, mb.data)}


def test_from_mds_takes_streamings_remote_and_local_keywords(mds_dir, tmp_path):
    cache = tmp_path / "cache"
    corpus = es.Corpus.from_mds(remote=str(mds_dir), local=str(cache))
    assert (cache / "index.json").exists() and corpus.mds.local == str(cache)
    samples = _all_samples(corpus)  # shards fetched from the remote on first read
    assert len(samples) == 50 and all(samples[i]["bin"] == payload(i) for i in range(50))
    positional = es.Corpus.from_mds(str(tmp_path / "cache2"), str(mds_dir))
    assert positional.fingerprint == corpus.fingerprint
    with pytest.raises(TypeError, match="local= or as the first argument"):
        es.Corpus.from_mds(str(cache), local=str(cache))
    with pytest.raises(TypeError, match="needs local="):
        es.Corpus.from_mds(remote=str(mds_dir))


def test_file_urls_index_and_read_like_paths(wds_dir, tmp_path, monkeypatch):
    plain = es.Corpus.from_webdataset(wds_dir)
    expected = _all_samples(plain)
    absolute = "file://" + str(wds_dir) + "/train-{000000..000004}.tar"
    monkeypatch.chdir(wds_dir.parent)
    for urls in (absolute, "file:" + str(wds_dir),
                 [f"file:wds/train-{s:06d}.tar" for s in range(5)]):
        corpus = es.Corpus.from_webdataset(urls)
        assert corpus.fingerprint == plain.fingerprint, urls
        assert corpus.check_fresh() is None
        got = _all_samples(corpus)
        assert {i: (s["__key__"], s["bin"]) for i, s in got.items()} == \
            {i: (s["__key__"], s["bin"]) for i, s in expected.items()}, urls
    with pytest.raises(es.ShardError, match="host 'elsewhere' is not a local path"):
        es.Corpus.from_webdataset("file://elsewhere/data/train.tar")


def _gzip_copy(src: str, dst: Path) -> None:
    import gzip

    dst.write_bytes(gzip.compress(Path(src).read_bytes()))


def test_directory_of_unreadable_shards_says_what_it_found(wds_dir, mds_dir, tmp_path):
    only_gz = tmp_path / "gz"
    only_gz.mkdir()
    for p in sorted(wds_dir.glob("*.tar"))[:2]:
        _gzip_copy(str(p), only_gz / (p.name + ".gz"))
    with pytest.raises(es.ShardError, match=r"no \.tar shards; it holds 2 compressed tar shards "
                       r"\(train-000000\.tar\.gz, train-000001\.tar\.gz\): .*pipe:gzip -dc"):
        es.Corpus.from_webdataset(only_gz)
    with pytest.raises(es.ShardError, match=r"MosaicML MDS files \(index\.json, .*\): index an MDS "
                       r"directory with Corpus\.from_mds"):
        es.Corpus.from_webdataset(mds_dir)
    nested = tmp_path / "nested"
    (nested / "train").mkdir(parents=True)
    write_wds(nested / "train", sizes=(3,))
    with pytest.raises(es.ShardError, match="subdirectories train hold .tar shards"):
        es.Corpus.from_webdataset(nested)
    # some .tar beside a compressed one: the .tar are the corpus, the other is named
    _gzip_copy(str(wds_dir / "train-000000.tar"), wds_dir / "extra-000000.tar.gz")
    with pytest.warns(UserWarning, match=r"5 \.tar shards only.*extra-000000\.tar\.gz"):
        corpus = es.Corpus.from_webdataset(wds_dir)
    assert corpus.num_shards == 5


def test_mds_ndarray_columns_collate_without_the_not_writable_warning(tmp_path):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "nd"), columns={"x": "ndarray:float32:3", "y": "ndarray",
                                                     "cls": "int"}, size_limit=1 << 10) as w:
        for i in range(20):
            w.write({"x": np.arange(3, dtype=np.float32) + i, "y": np.full(2, i, np.int64),
                     "cls": i})
    dataset = es.ESDataset(es.Corpus.from_mds(tmp_path / "nd"), 8, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable"
        batches = list(es.loader(dataset, num_workers=0))
    x = torch.cat([mb.data["x"] for mb in batches])
    assert torch.equal(x, torch.arange(3, dtype=torch.float32) + torch.arange(20.)[:, None])
    assert torch.equal(torch.cat([mb.data["y"] for mb in batches])[:, 0], torch.arange(20))


def test_es_streaming_dataset_ndarray_columns_are_writable(tmp_path):
    from streaming import MDSWriter
    from torch.utils.data import DataLoader

    from es_stream.integrations.streaming_dataset import ESStreamingDataset

    with MDSWriter(out=str(tmp_path / "nd"), columns={"x": "ndarray:float32:3"}) as w:
        for i in range(8):
            w.write({"x": np.full(3, i, np.float32)})
    ds = ESStreamingDataset(local=str(tmp_path / "nd"), batch_size=4, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xs = [b["x"] for b in DataLoader(ds, batch_size=4, num_workers=0)]
    assert torch.equal(torch.cat(xs)[:, 0], torch.arange(8.))
