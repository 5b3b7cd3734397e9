"""The corpus index beside the data: saved into moto's S3 and loaded from it (and over HTTP), so
nothing re-scans; staleness found by size and ETag; storage_options and the retry policy saved
with it (never credentials) and carried into DataLoader workers."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("obstore")

from es_stream import Corpus, ESDataset, loader  # noqa: E402
from es_stream.errors import IndexFileError, StaleIndexError  # noqa: E402
from es_stream.remote import RetryPolicy  # noqa: E402
from es_stream.remote.index import default_cache_dir  # noqa: E402
from es_stream.remote.tar import remote_corpus  # noqa: E402
from remote_fixtures import s3_server  # noqa: E402,F401 (fixture)
from servers import RangeHTTPServer  # noqa: E402

SECRET = "do-not-write-me-0123456789"


def _ids(corpus, workers=0):
    ds = ESDataset(corpus, 4, seed=3)
    # obstore ran in this process (from_mds read index.json through it), so not fork; spawn,
    # not forkserver: a forkserver started here would keep this test's environment (its moto
    # endpoint) for the workers of every later test in the session
    extra = {"multiprocessing_context": "spawn"} if workers else {}
    return [(mb.ids.tolist(), list(mb.data["bin"]))
            for mb in loader(ds, num_workers=workers, **extra)]


@pytest.fixture
def bucket(s3_server, wds_dir, monkeypatch):
    """The tar shards in moto's S3; credentials in the environment, the endpoint not: it is
    given by storage_options only, so what reads the shards must have been handed them."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    local = Corpus.from_webdataset(str(wds_dir))
    urls = s3_server.upload_dir("idx", wds_dir, prefix="tars")
    return s3_server, local, urls


def test_tar_index_saved_in_the_bucket_and_loaded_from_it(bucket):
    server, local, urls = bucket
    options = {"endpoint": server.url, "secret_access_key": SECRET}  # a secret: never saved
    retry = RetryPolicy(attempts=3, backoff=0.02, total_timeout=9.5)
    corpus = remote_corpus(local, urls, storage_options=options, retry=retry)
    url = "s3://idx/tars/es-stream-index.parquet"
    corpus.save(url)
    assert all(s.etag for s in corpus.shards)  # identities recorded when saved
    raw = server.client().get_object(Bucket="idx", Key="tars/es-stream-index.parquet")["Body"].read()
    assert SECRET.encode() not in raw and server.url.encode() in raw

    loaded = Corpus.load(url, storage_options={"endpoint": server.url})
    assert loaded.fingerprint == local.fingerprint
    assert [s.name for s in loaded.shards] == urls
    assert [s.etag for s in loaded.shards] == [s.etag for s in corpus.shards]
    assert loaded.storage_options == {"endpoint": server.url}  # no secret came back
    assert loaded.retry == retry
    again = pickle.loads(pickle.dumps(loaded))  # as DataLoader workers receive it
    assert again.storage_options == loaded.storage_options and again.retry == retry
    # workers reach the store by the corpus's storage_options alone (no AWS_ENDPOINT_URL)
    assert _ids(loaded, workers=2) == _ids(local, workers=2)


def test_changed_object_is_a_stale_index_naming_its_url(bucket):
    server, local, urls = bucket
    corpus = remote_corpus(local, urls, storage_options={"endpoint": server.url})
    url = "s3://idx/tars/es-stream-index.parquet"
    corpus.save(url)
    Corpus.load(url, storage_options={"endpoint": server.url})  # unchanged: loads
    client = server.client()
    key = urls[2].split("/", 3)[3]
    body = client.get_object(Bucket="idx", Key=key)["Body"].read()
    client.put_object(Bucket="idx", Key=key, Body=body[::-1])  # same size, other bytes
    with pytest.raises(StaleIndexError, match=f"{urls[2]}.*ETag"):
        Corpus.load(url, storage_options={"endpoint": server.url})
    assert Corpus.load(url, check=False, storage_options={"endpoint": server.url}).num_samples
    client.put_object(Bucket="idx", Key=key, Body=body + b"\0" * 512)
    with pytest.raises(StaleIndexError, match=f"{urls[2]}.*size"):
        Corpus.load(url, storage_options={"endpoint": server.url})


def test_index_copy_must_match_the_bucket_when_saved(bucket):
    """Saving pins each object's identity: a bucket copy that is not the indexed shard (another
    size) is refused then, not found an epoch later."""
    server, local, urls = bucket
    client = server.client()
    key = urls[0].split("/", 3)[3]
    client.put_object(Bucket="idx", Key=key, Body=b"short")
    corpus = remote_corpus(local, urls, storage_options={"endpoint": server.url})
    with pytest.raises(StaleIndexError, match=urls[0]):
        corpus.save("s3://idx/tars/es-stream-index.parquet")


def test_missing_or_broken_index_objects_are_named(bucket):
    server, _, _ = bucket
    opts = {"endpoint": server.url}
    with pytest.raises(FileNotFoundError, match="s3://idx/nothing.parquet"):
        Corpus.load("s3://idx/nothing.parquet", storage_options=opts)
    server.client().put_object(Bucket="idx", Key="bad.parquet", Body=b"not parquet")
    with pytest.raises(IndexFileError, match="s3://idx/bad.parquet"):
        Corpus.load("s3://idx/bad.parquet", storage_options=opts)


def test_index_loaded_over_https(wds_dir, tmp_path):
    local = Corpus.from_webdataset(str(wds_dir))
    with RangeHTTPServer(wds_dir) as server:
        names = [s.name.rsplit("/", 1)[1] for s in local.shards]
        corpus = remote_corpus(local, [f"{server.url}/{n}" for n in names])
        corpus.save(wds_dir / "es-stream-index.parquet")  # published beside the shards
        loaded = Corpus.load(f"{server.url}/es-stream-index.parquet")
        assert loaded.fingerprint == local.fingerprint
        assert all(s.etag for s in loaded.shards)
        assert _ids(loaded) == _ids(local)


def test_mds_index_in_the_bucket(s3_server, mds_dir, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.upload_dir("mdsidx", mds_dir, prefix="ds")
    corpus = Corpus.from_mds("s3://mdsidx/ds", storage_options={"endpoint": s3_server.url})
    corpus.save("s3://mdsidx/ds/es-stream-index.parquet")
    loaded = Corpus.load("s3://mdsidx/ds/es-stream-index.parquet")
    assert loaded.storage_options == {"endpoint": s3_server.url}
    assert loaded.mds.remote == "s3://mdsidx/ds"
    assert loaded.mds.local == default_cache_dir("s3://mdsidx/ds", None)  # this machine's
    assert _ids(loaded, workers=2) == _ids(Corpus.from_mds(str(mds_dir)), workers=2)
    client = s3_server.client()
    name = corpus.shards[3].name
    client.put_object(Bucket="mdsidx", Key=f"ds/{name}", Body=(mds_dir / name).read_bytes()[::-1])
    with pytest.raises(StaleIndexError, match=f"s3://mdsidx/ds/{name}"):
        Corpus.load("s3://mdsidx/ds/es-stream-index.parquet")


def test_storable_options_never_keep_credentials():
    from es_stream.remote.index import storable_options

    given = {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1", "allow_http": True,
             "access_key_id": "AKIA", "secret_access_key": SECRET, "session_token": SECRET,
             "token": SECRET, "default_headers": {"Authorization": SECRET},
             "proxy_url": "http://u:p@proxy:3128", "service_account_key": SECRET}
    assert storable_options(given) == {"endpoint": "http://127.0.0.1:9000",
                                       "region": "eu-west-1", "allow_http": True}
    assert storable_options({"endpoint": "https://user:pw@host"}) == {}  # a password in it


def test_local_index_keeps_retry_and_options(tmp_path, wds_dir):
    local = Corpus.from_webdataset(str(wds_dir))
    local.storage_options = {"region": "eu-west-1", "secret_access_key": SECRET}
    local.retry = RetryPolicy(attempts=2, total_timeout=4.0)
    local.save(tmp_path / "i.parquet")
    assert SECRET.encode() not in (tmp_path / "i.parquet").read_bytes()
    loaded = Corpus.load(tmp_path / "i.parquet")
    assert loaded.storage_options == {"region": "eu-west-1"} and loaded.retry == local.retry
    plain = Corpus.from_webdataset(str(wds_dir))
    plain.save(tmp_path / "p.parquet")  # nothing remote: no entry, the defaults come back
    again = Corpus.load(tmp_path / "p.parquet")
    assert again.storage_options == {} and again.retry is None


def test_cli_index_tells_a_remote_mds_prefix_from_tar_shards(s3_server, mds_dir, wds_dir,
                                                           monkeypatch, tmp_path, capsys):
    """`es-stream index s3://bucket/prefix` indexes an MDS dataset there without --format,
    and a tar shard URL stays a tar shard."""
    from es_stream.cli import main
    from es_stream.remote.index import holds_mds

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.upload_dir("climds", mds_dir, prefix="ds")
    tars = s3_server.upload_dir("clitar", wds_dir)
    assert holds_mds("s3://climds/ds") and not holds_mds("s3://climds/nothing")
    assert not holds_mds(tars[0]) and holds_mds(str(mds_dir)) and not holds_mds(str(wds_dir))
    out = tmp_path / "corpus.parquet"
    assert main(["index", "s3://climds/ds", "-o", str(out)]) == 0
    corpus = Corpus.load(str(out))
    assert corpus.format == "mds" and corpus.mds.remote == "s3://climds/ds"
    assert corpus.num_samples == Corpus.from_mds(str(mds_dir)).num_samples
    pattern = f"s3://clitar/train-{{000000..{len(tars) - 1:06d}}}.tar"
    assert main(["index", pattern, "-o", str(tmp_path / "tar.parquet"), "--no-progress"]) == 0
    tar = Corpus.load(str(tmp_path / "tar.parquet"))
    assert [s.name for s in tar.shards] == tars
    assert tar.fingerprint == Corpus.from_webdataset(str(wds_dir)).fingerprint
