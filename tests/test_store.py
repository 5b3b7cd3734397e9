"""ScoreStore: in-memory and memory-mapped backings behave the same; saves are atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from es_stream import ScoreStore


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


def test_memmap_is_created_sparse_and_rejects_another_corpus(tmp_path):
    store = ScoreStore.open(tmp_path / "big.npy", 50_000_000)  # 200 MB logical
    assert os.stat(tmp_path / "big.npy").st_blocks * 512 < 1_000_000  # nothing written up front
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
