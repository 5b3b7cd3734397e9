"""Checkpointer: round trip with a selector and a memory-mapped store, keep-N pruning, leftovers
of interrupted saves ignored then cleaned, and the errors. (Kills of real processes: test_crash.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from es_stream import Checkpointer, ESSelector, ScoreStore

N, B, b = 64, 16, 4


def train(selector: ESSelector, steps: int, seed: int) -> list[list[int]]:
    """A few selection steps with deterministic ids and losses; returns what was selected."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(steps):
        ids = torch.from_numpy(rng.permutation(N)[:B])
        losses = torch.from_numpy(rng.random(B).astype(np.float32))
        chosen.append(ids[selector.select(ids, losses)].tolist())
    return chosen


def test_round_trip_selector_and_memmap_store(tmp_path):
    store = ScoreStore.open(tmp_path / "live.npy", N)
    sel = ESSelector(N, b, store=store, seed=3)
    train(sel, 5, seed=0)
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest() is None and ckpt.load() is None
    # the scores go to scores.npy (their metadata beside), so the selector's state leaves them out
    path = ckpt.save(5, {"selector": sel.state_dict(), "epoch": 1}, store)
    assert path == str(tmp_path / "ckpt" / "step-000000000005") == ckpt.latest()
    assert sorted(os.listdir(path)) == ["scores.meta.json", "scores.npy", "state.pt"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-000000000005\n"
    saved_scores = store.to_numpy().copy()
    expected_next = train(sel, 3, seed=1)  # the run goes on after the checkpoint
    store.flush()  # (updates wait in the store's write buffer until a flush)

    # a fresh process: the live file has moved on, the checkpoint restores step 5 exactly
    store2 = ScoreStore.open(tmp_path / "live.npy", N)
    assert not np.array_equal(store2.to_numpy(), saved_scores)
    sel2 = ESSelector(N, b, store=store2, seed=99)
    step, state = Checkpointer(tmp_path / "ckpt").load(store2)
    assert step == 5 and state["epoch"] == 1
    np.testing.assert_array_equal(store2.to_numpy(), saved_scores)
    sel2.load_state_dict(state["selector"])
    assert sel2.step == 5
    assert train(sel2, 3, seed=1) == expected_next
    np.testing.assert_array_equal(store2.to_numpy(), store.to_numpy())


def test_in_memory_store_and_no_store(tmp_path):
    store = ScoreStore(N)
    store.scatter(torch.arange(N), torch.linspace(0.5, 2.0, N))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(0, {"x": torch.arange(3)}, store)
    other = ScoreStore(N)
    step, state = ckpt.load(other, weights_only=True)
    assert step == 0 and torch.equal(state["x"], torch.arange(3))
    np.testing.assert_array_equal(other.to_numpy(), store.to_numpy())
    ckpt.save(1, {"x": 1})  # no store: no scores.npy
    assert os.listdir(ckpt.latest()) == ["state.pt"]
    assert ckpt.load() == (1, {"x": 1})


def test_keep_two_newest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"step": step})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-000000000030", "step-000000000040"]
    assert ckpt.load() == (40, {"step": 40})
    one = Checkpointer(tmp_path / "one", keep=1)
    one.save(1, {})
    one.save(2, {})
    assert sorted(os.listdir(tmp_path / "one")) == ["latest", "step-000000000002"]
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        Checkpointer(tmp_path, keep=0)


def test_the_default_keeps_the_two_newest_as_documented(tmp_path):
    default = Checkpointer(tmp_path)
    assert default.keep == 2 and "keep: how many of the newest" in Checkpointer.__doc__
    for step in (1, 2, 3):
        default.save(step, {"step": step})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-000000000002", "step-000000000003"]


def test_leftovers_ignored_then_cleaned(tmp_path):
    store = ScoreStore(N)
    store.scatter(torch.arange(N), torch.full((N,), 0.25))
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(1, {"step": 1}, store)
    ckpt.save(2, {"step": 2}, store)
    # what kills at various moments leave behind
    half = tmp_path / "step-000000000003"  # newer than latest: never committed
    half.mkdir()
    (half / "scores.npy").write_bytes(b"\x93NUMPY garbage")
    (half / ".state.pt.abc.tmp").write_bytes(b"half")
    (tmp_path / ".latest.xyz.tmp").write_text("step-000000000003\n")
    trash = tmp_path / ".trash-step-000000000000"
    trash.mkdir()
    (trash / "state.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")  # not ours: left alone
    # readers see the committed checkpoint only
    assert ckpt.latest() == str(tmp_path / "step-000000000002")
    other = ScoreStore(N)
    assert ckpt.load(other) == (2, {"step": 2})
    np.testing.assert_array_equal(other.to_numpy(), store.to_numpy())
    # the next save (here: step 3 again, as a resumed run would) cleans up
    ckpt.save(3, {"step": 3}, store)
    assert sorted(os.listdir(tmp_path)) == ["latest", "notes.txt", "step-000000000002",
                                            "step-000000000003"]
    assert sorted(os.listdir(tmp_path / "step-000000000003")) == ["scores.meta.json", "scores.npy",
                                                                  "state.pt"]
    assert ckpt.load(other) == (3, {"step": 3})


def test_errors_name_the_file(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(7, {"a": 1})
    latest = str(tmp_path / "latest")
    with pytest.raises(ValueError, match="steps must increase"):
        ckpt.save(7, {"a": 2})
    # the checkpoint has no scores, or scores of another size
    with pytest.raises(FileNotFoundError, match=r"step-000000000007/scores.npy: this checkpoint "
                                                r"holds no scores"):
        ckpt.load(ScoreStore(N))
    ckpt.save(8, {}, ScoreStore(N))
    with pytest.raises(ValueError, match=r"scores.npy: holds 64 scores, the store has 65"):
        ckpt.load(ScoreStore(N + 1))
    # latest names a directory that is gone: readers and writers refuse, saying what to do
    os.rename(tmp_path / "step-000000000008", tmp_path / "moved")
    for call in (ckpt.latest, ckpt.load, lambda: ckpt.save(9, {})):
        with pytest.raises(FileNotFoundError, match=rf"{latest}: names step-000000000008, which "
                                                    r"does not exist.*delete .*latest to start"):
            call()
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(ValueError, match=rf"{latest}: expected the name of a step directory"):
        ckpt.load()
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        ckpt.save(-1, {})


# --- damaged files, other corpora, numpy integers ------------------------------------------

from es_stream import ScoreError  # noqa: E402


def test_damaged_state_names_the_file_and_the_way_out(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, {"step": step})
    state = tmp_path / "step-000000000002" / "state.pt"
    for garbage in (b"", b"\x80\x04garbage", state.read_bytes()[:40]):
        state.write_bytes(garbage)
        with pytest.raises(ValueError, match=rf"{state}: cannot be read as a checkpoint state .*"
                                             r"step-000000000002 is damaged: write the name of an "
                                             r"older step directory \(step-000000000001\) into "
                                             rf"{tmp_path / 'latest'}"):
            ckpt.load()
    (tmp_path / "latest").write_text("step-000000000001\n")  # the way out the message gives
    assert ckpt.load() == (1, {"step": 1})


def test_garbage_latest_names_the_file(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {})
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'latest'}: expected the name of a step "
                                         r"directory.*delete it to start over"):
        ckpt.load()


@pytest.mark.parametrize("garbage", [b"", b"garbage, not numpy", b"\x93NUMPY\x01\x00"])
def test_damaged_scores_name_the_file(tmp_path, garbage):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {}, ScoreStore(N))
    scores = tmp_path / "step-000000000001" / "scores.npy"
    scores.write_bytes(garbage)
    with pytest.raises(ScoreError, match=rf"{scores}: not a .npy score file.*is damaged"):
        ckpt.load(ScoreStore(N))


def test_scores_travel_with_their_corpus(tmp_path):
    store = ScoreStore(N, fingerprint="corpus-a")
    store.scatter(torch.arange(10), torch.full((10,), 0.5))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {}, store)
    with pytest.raises(ScoreError, match=r"scores.npy: scores of corpus corpus-a .* this corpus is "
                                         r"corpus-b"):
        ckpt.load(ScoreStore(N, fingerprint="corpus-b"))
    restored = ScoreStore.open(tmp_path / "live.npy", N)
    ckpt.load(restored)
    assert restored.fingerprint == "corpus-a"  # learnt from the checkpoint
    np.testing.assert_array_equal(restored.scored_range(0, N), np.arange(N) < 10)  # never-scored too


def test_numpy_integers_are_integers(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=np.int64(1))
    ckpt.save(np.int64(3), {"a": 1})
    ckpt.save(np.uint8(4), {"a": 2})
    assert ckpt.load() == (4, {"a": 2}) and ckpt.keep == 1
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 1.0"):
        Checkpointer(tmp_path, keep=1.0)


class _WritesAFile:
    """Unpickling it creates ``path``: the stand-in for a checkpoint that runs someone's code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(tmp_path):
    from es_stream import TrainingState

    marker = tmp_path / "code-ran"
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, {"selector": ESSelector(N, b).state_dict(), "payload": _WritesAFile(str(marker))})
    state_pt = tmp_path / "ckpt" / "step-000000000001" / "state.pt"
    refused = (rf"{state_pt}: refused: it holds io\.open.*would run code from the file.*"
               r"weights_only=False")
    with pytest.raises(ValueError, match=refused):
        ckpt.load()
    with pytest.raises(ValueError, match=refused):  # the two-line resume refuses it too
        ckpt.restore(TrainingState(selector=ESSelector(N, b), rng=False))
    assert not marker.exists()
    # the named opt-in reads it (and runs its code): for files one trusts
    step, state = ckpt.load(weights_only=False)
    assert step == 1 and marker.exists()


def test_a_training_state_checkpoint_loads_without_unpickling_objects(tmp_path):
    """Everything TrainingState saves (rng states included) is read with weights_only=True."""
    from es_stream import TrainingState

    sel = ESSelector(N, b, seed=3)
    train(sel, 3, seed=1)
    np.random.seed(5)
    torch.manual_seed(6)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, TrainingState(selector=sel))
    expected = (np.random.random(3), torch.rand(3))
    np.random.seed(0)
    torch.manual_seed(0)
    resumed = ESSelector(N, b, seed=99)
    assert ckpt.restore(TrainingState(selector=resumed)) == 3  # weights_only=True by default
    np.testing.assert_array_equal(np.random.random(3), expected[0])
    assert torch.equal(torch.rand(3), expected[1])
    assert train(resumed, 3, seed=2) == train(sel, 3, seed=2)
