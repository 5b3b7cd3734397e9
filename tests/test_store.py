"""ScoreStore: in-memory and memory-mapped backings behave the same; saves are atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from es_stream import ScoreStore
from es_stream.store import MappedScoreStore, MemoryScoreStore


@pytest.fixture(params=["memory", "memmap"])
def store(request, tmp_path):
    return ScoreStore(1000) if request.param == "memory" else ScoreStore.open(tmp_path / "s.npy", 1000)


def test_initialised_to_one_over_n(store):
    assert torch.allclose(store.gather(torch.tensor([0, 5, 999])), torch.full((3,), 1e-3))


def test_gather_scatter_round_trip(store):
    ids = torch.tensor([3, 700, 12])
    store.scatter(ids, torch.tensor([0.5, 2.0, 0.25]))
    assert store.gather(torch.tensor([12, 3, 700, 4])).tolist() == [0.25, 0.5, 2.0, pytest.approx(1e-3)]


def test_out_of_range_ids_are_refused(store):
    with pytest.raises(IndexError, match="sample id 1000 is outside \\[0, 1000\\)"):
        store.gather(torch.tensor([1, 1000]))
    with pytest.raises(TypeError, match="integer"):
        store.gather(torch.tensor([1.0]))


def test_save_load_and_reopen(store, tmp_path):
    store.scatter(torch.tensor([1, 2]), torch.tensor([7.0, 8.0]))
    store.save(tmp_path / "saved.npy")
    loaded = ScoreStore.load(tmp_path / "saved.npy")
    assert loaded.gather(torch.tensor([1, 2, 3])).tolist() == [7.0, 8.0, pytest.approx(1e-3)]
    reopened = ScoreStore.open(tmp_path / "saved.npy", 1000)
    assert reopened.gather(torch.tensor([2])).tolist() == [8.0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_memmap_is_created_allocated_and_rejects_another_corpus(tmp_path):
    store = ScoreStore.open(tmp_path / "big.npy", 50_000_000)  # 200 MB
    assert isinstance(store, MappedScoreStore) and store.memory_mapped
    # every block reserved up front (a full disk is an error now, not a SIGBUS later)
    size = os.stat(tmp_path / "big.npy").st_size
    if hasattr(os, "posix_fallocate"):
        assert os.stat(tmp_path / "big.npy").st_blocks * 512 >= size
    store.scatter(torch.tensor([49_999_999]), torch.tensor([3.0]))
    store.flush()
    assert np.load(tmp_path / "big.npy", mmap_mode="r")[49_999_999] == 3.0
    with pytest.raises(ValueError, match="big.npy: holds float32 \\(50000000,\\).*another corpus"):
        ScoreStore.open(tmp_path / "big.npy", 10)


def test_state_dict_is_a_snapshot(store):
    state = store.state_dict()
    store.scatter(torch.tensor([0]), torch.tensor([9.0]))
    assert state["scores"][0] == pytest.approx(1e-3)
    store.load_state_dict(state)
    assert store.gather(torch.tensor([0])).item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="state is for 1000 samples, this store has 5"):
        ScoreStore(5).load_state_dict(state)


def test_bad_size():
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        ScoreStore(0)


def test_memmap_buffer_reaches_the_file_sorted_and_gathers_see_it_before(tmp_path, monkeypatch):
    monkeypatch.setattr("es_stream.store.CHUNK", 64)  # several ranges per pass
    store = ScoreStore.open(tmp_path / "s.npy", 1000, buffer_size=50)
    rng = np.random.default_rng(1)
    truth = np.full(1000, 1e-3, np.float32)
    for _ in range(30):  # 30 x 20 updates: the buffer fills and is applied several times
        ids = rng.choice(1000, 20, replace=False)
        values = rng.random(20).astype(np.float32) + 0.5
        store.scatter(torch.from_numpy(ids), torch.from_numpy(values))
        truth[ids] = values
        q = rng.integers(0, 1000, 100)
        assert store.gather(torch.from_numpy(q)).numpy().tolist() == truth[q].tolist()
    assert len(store._buffer) < 50
    store.flush()
    assert np.load(tmp_path / "s.npy")[truth != np.float32(1e-3)].tolist() == \
        truth[truth != np.float32(1e-3)].tolist()
    assert store.to_numpy().tolist() == truth.tolist()


def test_chunked_save_and_restore_between_backings(tmp_path, monkeypatch):
    monkeypatch.setattr("es_stream.store.CHUNK", 128)
    src = ScoreStore.open(tmp_path / "a.npy", 1000, buffer_size=10)
    values = torch.rand(1000) + 0.1
    src.scatter(torch.arange(1000), values)
    src.save(tmp_path / "saved.npy")
    for dst in (ScoreStore(1000), ScoreStore.open(tmp_path / "b.npy", 1000)):
        dst.scatter(torch.tensor([5]), torch.tensor([9.0]))  # pending work is replaced too
        dst.restore(tmp_path / "saved.npy")
        assert torch.equal(dst.gather(torch.arange(1000)), values)
    with pytest.raises(ValueError, match="saved.npy: holds float32 \\(1000,\\).*another corpus"):
        ScoreStore(10).restore(tmp_path / "saved.npy")


def test_truncated_memmap_file_is_refused_with_the_fix(tmp_path):
    ScoreStore.open(tmp_path / "s.npy", 1000).flush()
    with open(tmp_path / "s.npy", "rb+") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="s.npy: 1000 bytes, expected 4128.*truncated"):
        ScoreStore.open(tmp_path / "s.npy", 1000)


def test_buffered_updates_reach_the_file_when_the_process_exits(tmp_path):
    import subprocess
    import sys

    script = ("import torch; from es_stream import ScoreStore; "
              f"s = ScoreStore.open({str(tmp_path / 's.npy')!r}, 100); "
              "s.scatter(torch.tensor([7, 3]), torch.tensor([0.5, 0.25]))")
    subprocess.run([sys.executable, "-c", script], check=True)
    saved = np.load(tmp_path / "s.npy")
    assert saved[[7, 3]].tolist() == [0.5, 0.25]


# --- bad values, never-scored samples, corpus fingerprints, bad files ------------------------

import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from es_stream import ScoreError  # noqa: E402


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_updates_are_refused_and_change_nothing(store, bad):
    store.scatter(torch.tensor([1]), torch.tensor([0.5]))
    with pytest.raises(ScoreError, match=r"1 non-finite score\(s\) given to scatter, the first for "
                                         r"sample id 8 .*check the training loss"):
        store.scatter(torch.tensor([4, 8]), torch.tensor([2.0, bad]))
    assert store.gather(torch.tensor([1, 4, 8])).tolist() == [0.5, pytest.approx(1e-3), pytest.approx(1e-3)]
    with pytest.raises(ScoreError, match="sample id 12"):
        store.write_range(10, np.array([1.0, 1.0, bad], np.float32))
    state = store.state_dict()
    state["scores"][3] = bad
    with pytest.raises(ScoreError, match=r"state\['scores'\].*sample id 3"):
        store.load_state_dict(state)


def test_a_file_with_nan_is_refused_by_restore_and_load(tmp_path):
    scores = np.full(100, 0.5, np.float32)
    scores[[7, 9]] = np.nan
    np.save(tmp_path / "nan.npy", scores)
    target = ScoreStore(100)
    target.scatter(torch.tensor([1]), torch.tensor([3.0]))
    with pytest.raises(ScoreError, match=rf"{tmp_path / 'nan.npy'}: 2 non-finite score\(s\) in the "
                                         r"file, the first for sample id 7"):
        target.restore(tmp_path / "nan.npy")
    assert target.gather(torch.tensor([1, 7])).tolist() == [3.0, pytest.approx(0.01)]  # untouched
    with pytest.raises(ScoreError, match="nan.npy"):
        ScoreStore.load(tmp_path / "nan.npy")


def test_never_scored_is_known_and_survives_save_restore_and_state(store, tmp_path):
    store.scatter(torch.tensor([3, 5, 7]), torch.tensor([0.25, 0.0, 1e-3]))  # 0 and 1/n: scored
    expected = np.zeros(1000, bool)
    expected[[3, 5, 7]] = True
    np.testing.assert_array_equal(store.scored_range(0, 1000), expected)
    got = store.gather(torch.tensor([3, 5, 7, 8])).tolist()
    assert got[0] == 0.25 and 0 <= got[1] < 1e-30 and got[2:] == [pytest.approx(1e-3)] * 2
    store.save(tmp_path / "saved.npy")
    assert np.load(tmp_path / "saved.npy")[8] == 0.0  # the file format: 0.0 = never scored
    restored = ScoreStore.open(tmp_path / "other.npy", 1000)
    restored.restore(tmp_path / "saved.npy")
    for other in (ScoreStore.load(tmp_path / "saved.npy"), ScoreStore.open(tmp_path / "saved.npy", 1000),
                  restored):
        np.testing.assert_array_equal(other.scored_range(0, 1000), expected)
        np.testing.assert_array_equal(other.to_numpy(), store.to_numpy())
    fresh = ScoreStore(1000)
    fresh.load_state_dict(store.state_dict())
    np.testing.assert_array_equal(fresh.scored_range(0, 1000), expected)
    np.testing.assert_array_equal(fresh.to_numpy(), store.to_numpy())


def test_pruning_decay_leaves_never_scored_samples_unscored(tmp_path):
    from conftest import write_wds

    from es_stream import Corpus, ESWPPolicy, Pruner

    write_wds(tmp_path / "wds")
    corpus = Corpus.from_webdataset(str(tmp_path / "wds"))
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(40), torch.rand(40) + 0.5)
    Pruner(corpus, store, ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0), tmp_path / "m",
           decay=0.5).on_epoch_end(0, 4)
    assert not store.scored_range(40, 50).any()


def test_save_records_the_corpus_and_another_corpus_is_refused(tmp_path):
    store = ScoreStore(100, fingerprint="aaaa")
    store.scatter(torch.tensor([1]), torch.tensor([2.0]))
    store.save(tmp_path / "s.npy")
    meta = json.loads((tmp_path / "s.meta.json").read_text())
    assert meta["corpus_fingerprint"] == "aaaa" and meta["num_samples"] == 100
    assert "es_stream_version" in meta
    both = r"s.npy: scores of corpus aaaa \(per .*s.meta.json\), this corpus is bbbb"
    with pytest.raises(ScoreError, match=both):
        ScoreStore.load(tmp_path / "s.npy", fingerprint="bbbb")
    with pytest.raises(ScoreError, match=both):
        ScoreStore.open(tmp_path / "s.npy", 100, fingerprint="bbbb")
    with pytest.raises(ScoreError, match=both):
        ScoreStore(100, fingerprint="bbbb").restore(tmp_path / "s.npy")
    assert ScoreStore.load(tmp_path / "s.npy").fingerprint == "aaaa"  # learnt from the file
    with pytest.raises(ScoreError, match="holds scores of corpus aaaa, not of corpus bbbb"):
        ScoreStore.load(tmp_path / "s.npy").bind("bbbb")
    assert ScoreStore.load(tmp_path / "s.npy", fingerprint="aaaa").gather(torch.tensor([1])).item() == 2.0


def test_a_memory_mapped_store_records_the_corpus_it_is_bound_to(tmp_path):
    live = ScoreStore.open(tmp_path / "live.npy", 100)
    assert json.loads((tmp_path / "live.meta.json").read_text())["corpus_fingerprint"] is None
    live.bind("aaaa")
    assert json.loads((tmp_path / "live.meta.json").read_text())["corpus_fingerprint"] == "aaaa"
    with pytest.raises(ScoreError, match="live.npy: scores of corpus aaaa"):
        ScoreStore.open(tmp_path / "live.npy", 100, fingerprint="bbbb")


def test_a_plain_npy_is_accepted_with_a_warning(tmp_path):
    np.save(tmp_path / "mine.npy", np.full(100, 0.5, np.float32))
    with pytest.warns(UserWarning, match=r"mine.npy: no mine.meta.json beside it .* corpus aaaa"):
        store = ScoreStore.load(tmp_path / "mine.npy", fingerprint="aaaa")
    assert store.gather(torch.tensor([0])).item() == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to check against: no warning
        ScoreStore.open(tmp_path / "mine.npy", 100)
    assert not (tmp_path / "mine.meta.json").exists()  # nothing written beside the user's file


@pytest.mark.parametrize("content,match", [
    (b"not a numpy file at all", r"not a .npy score file \(the magic string is not correct"),
    (b"\x93NUM", r"not a .npy score file \(EOF"),
    ("float64", r"holds float64 \(100,\), expected a float32 vector"),
    ("2d", r"holds float32 \(10, 10\), expected a float32 vector"),
    ("truncated", r"300 bytes, expected 528: the file is truncated"),
])
def test_bad_files_are_refused_naming_them(tmp_path, content, match):
    path = tmp_path / "scores.npy"
    if content == "float64":
        np.save(path, np.zeros(100))
    elif content == "2d":
        np.save(path, np.zeros((10, 10), np.float32))
    elif content == "truncated":
        np.save(path, np.zeros(100, np.float32))
        os.truncate(path, 300)
    else:
        path.write_bytes(content)
    for call in (lambda: ScoreStore.load(path), lambda: ScoreStore.open(path, 100),
                 lambda: ScoreStore(100).restore(path)):
        with pytest.raises(ScoreError, match=rf"{path}: {match}"):
            call()


def test_garbage_metadata_is_refused_naming_it(tmp_path):
    ScoreStore(10).save(tmp_path / "s.npy")
    (tmp_path / "s.meta.json").write_bytes(b"\xff\x00garbage")
    with pytest.raises(ScoreError, match=r"s.meta.json: not the metadata of a score store.*delete it"):
        ScoreStore.load(tmp_path / "s.npy")


def test_numpy_ids_values_and_sizes_work_where_tensors_and_ints_do(store):
    store.scatter(np.array([3, 4], np.uint32), np.array([0.5, 0.75], np.float32))
    store.scatter([9], [2.0])
    assert store.gather(np.array([4, 3, 9], np.int32)).tolist() == [0.75, 0.5, 2.0]
    assert store.gather(np.array([], np.int64)).numel() == 0
    with pytest.raises(TypeError, match="ids must be integer sample ids, got float64"):
        store.gather(np.array([1.0]))
    with pytest.raises(TypeError, match="ids must be an integer tensor of sample ids, got dtype torch.bool"):
        store.gather(torch.tensor([True]))
    assert ScoreStore(np.int64(8)).num_samples == 8
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 2.0"):
        ScoreStore(2.0)


def test_a_killed_save_leaves_temporaries_the_next_save_removes(tmp_path):
    path = tmp_path / "s.npy"
    ScoreStore(1000).save(path)
    # a real process killed inside save, just before its files would be renamed into place
    script = ("import os, signal, torch; from es_stream import ScoreStore\n"
              "os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"s = ScoreStore(1000); s.scatter(torch.tensor([1]), torch.tensor([2.0])); s.save({str(path)!r})")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp"))
    assert left and all(p.startswith((".s.npy.", ".s.meta.json.")) for p in left)
    (tmp_path / ".other.npy.abcd1234.tmp").write_bytes(b"another file's: left alone")
    (tmp_path / ".s.npy.notes.txt").write_bytes(b"not our pattern: left alone")
    assert ScoreStore.load(path).gather(torch.tensor([1])).item() == pytest.approx(1e-3)  # old one
    ScoreStore(1000).save(path)
    assert sorted(os.listdir(tmp_path)) == [".other.npy.abcd1234.tmp", ".s.npy.notes.txt",
                                            "s.meta.json", "s.npy"]
    for p in left:  # and open cleans up the same way
        (tmp_path / p).write_bytes(b"")
    ScoreStore.open(path, 1000)
    assert not [p for p in os.listdir(tmp_path) if p in left]


def test_one_class_per_backing_behind_one_constructor(tmp_path):
    memory = ScoreStore(10)
    mapped = ScoreStore.open(tmp_path / "s.npy", 10)
    assert type(memory) is MemoryScoreStore and type(mapped) is MappedScoreStore
    assert isinstance(memory, ScoreStore) and isinstance(mapped, ScoreStore)
    assert type(ScoreStore.load(tmp_path / "s.npy")) is MemoryScoreStore
    for store in (memory, mapped):  # the same answers from either backing
        store.scatter([1, 3], [2.0, 0.0])
        assert store.to_numpy()[[0, 1, 3]].tolist() == pytest.approx([0.1, 2.0, 0.0])
        assert store.scored_range(0, 4).tolist() == [False, True, False, True]


def test_channel_is_made_once_per_device_and_flushed_by_the_store():
    store = ScoreStore(20)
    channel = store.channel("cpu", max_pending=4)
    assert store.channel(torch.device("cpu")) is channel and channel.max_pending == 4
    channel.commit(torch.tensor([5]), torch.tensor([7.0]))
    assert channel.pending == 1
    assert store.read_range(5, 6).tolist() == [7.0]  # a whole-store read commits it first
    assert channel.pending == 0
    with pytest.raises(ValueError, match="needs a host store"):
        ScoreStore(4, device="meta").channel("cpu")


def _mount_small_tmpfs(directory):
    """Mount a 1 MiB tmpfs at ``directory``, or skip (needs root and a mount namespace)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root")
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def test_a_store_that_does_not_fit_the_disk_is_an_error_naming_it(tmp_path):
    full = tmp_path / "full"
    _mount_small_tmpfs(full)
    try:
        # 1M scores are 4 MB on a 1 MiB file system: refused at creation, naming the file,
        # instead of a SIGBUS when the scores are first written back
        with pytest.raises(ScoreError, match=f"{full / 'scores.npy'}: no space"):
            ScoreStore.open(full / "scores.npy", 1_000_000)
        assert os.listdir(full) == []  # nothing left behind
        # an existing sparse file (as older versions made) is allocated when opened
        with open(full / "old.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000,)})
            f.truncate(f.tell() + 4_000_000)
        with pytest.raises(ScoreError, match=f"{full / 'old.npy'}: no space"):
            ScoreStore.open(full / "old.npy", 1_000_000)
        small = ScoreStore.open(full / "small.npy", 1000)  # what fits works as before
        small.scatter([999], [4.0])
        small.flush()
        assert np.load(full / "small.npy")[999] == 4.0
        del small
        gc.collect()  # its mapping closed, so the file system can be unmounted
    finally:
        if subprocess.run(["umount", str(full)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(full)], check=False)
