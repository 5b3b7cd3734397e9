"""RS2 (a fresh random subset per epoch, without replacement across epochs): the policy's draws,
then a real Pruner writing its manifests for real shards read by ESDataset with real workers,
and a resumed run rewriting them byte for byte."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from es_stream import Corpus, ESDataset, Pruner, RS2Policy, ScoreStore, loader
from es_stream.schedule import first_decided_epoch, schedule_warning


def decide(policy: RS2Policy, n: int, epoch: int) -> np.ndarray:
    scores = np.zeros(n, np.float32)
    parts = list(policy.decide(lambda a, b: scores[a:b], n, epoch, 10))
    return np.concatenate([d.keep for d in parts]) if parts else np.zeros(0, bool)


@pytest.mark.parametrize("n", [1, 7, 100, 1001])
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 1.0])
def test_every_sample_once_before_any_twice(n, keep):
    policy = RS2Policy(keep, seed=3)
    k = math.ceil(keep * n)
    seen = np.zeros(n, int)
    full_epochs = n // k  # epochs that lie wholly inside the first walk over the corpus
    for epoch in range(full_epochs):
        mask = decide(policy, n, epoch)
        assert mask.sum() == k
        seen += mask
    assert seen.max() <= 1  # without replacement across epochs
    if n % k == 0:
        assert (seen == 1).all()  # the corpus exhausted exactly
    else:  # the straddling epoch: the rest of this walk, then the start of the next
        mask = decide(policy, n, full_epochs)
        assert (seen + mask >= 1).all() and k - (n % k) >= mask.sum() - (n - seen.sum()) >= 0
        assert mask.sum() <= k


def test_subsets_are_fresh_seeded_and_uniform():
    n, keep = 1000, 0.2
    a, b = RS2Policy(keep, seed=0), RS2Policy(keep, seed=1)
    assert (decide(a, n, 2) == decide(RS2Policy(keep, seed=0), n, 2)).all()  # deterministic
    assert not (decide(a, n, 0) == decide(b, n, 0)).all()  # the seed matters
    assert not (decide(a, n, 0) == decide(a, n, 5)).all()  # a new cycle, a new permutation
    # over many cycles every sample is kept about as often (uniform): 50 epochs = 10 cycles
    counts = sum(decide(a, n, e).astype(int) for e in range(50))
    assert (counts == 10).all()


def test_bad_keep_is_refused_by_name():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep must be a share"):
            RS2Policy(bad)


def test_first_epoch_is_its_own_and_every_epoch_prunes():
    policy = RS2Policy(0.5)
    assert first_decided_epoch(policy) == 0
    assert schedule_warning(policy, 1) is None  # a one-epoch run is pruned too


def read_ids(ds: ESDataset, dl, epoch: int) -> list[int]:
    ds.set_epoch(epoch)
    return sorted(i for mb in dl for i in mb.ids.tolist())


def test_pruner_writes_it_for_real_shards_and_a_resumed_run_rewrites_it(wds_dir, tmp_path: Path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    n = corpus.num_samples
    policy = RS2Policy(0.3, seed=5)
    k = policy.per_epoch(n)

    def pruner(out: Path) -> Pruner:
        return Pruner(corpus, ScoreStore(n, fingerprint=corpus.fingerprint), RS2Policy(0.3, seed=5),
                      str(out))

    first = pruner(tmp_path / "m")
    first.write(0, 4)  # epoch 0 before training: RS2 prunes it too
    for epoch in range(3):
        first.on_epoch_end(epoch, 4)
    ds = ESDataset(corpus, 4, manifests=tmp_path / "m", seed=1)
    dl = loader(ds, num_workers=2)  # real workers read the manifests
    epochs = [read_ids(ds, dl, e) for e in range(4)]
    for e, ids in enumerate(epochs):  # exactly the policy's draw for each epoch
        assert ids == policy.kept_ids(n, e).tolist()
    walk = [i for ids in epochs[:n // k] for i in ids]
    assert len(walk) == len(set(walk)) == (n // k) * k  # no sample twice within a walk
    # a run killed after epoch 1 and resumed from the pruner's state writes the same files
    again = pruner(tmp_path / "r")
    again.load_state_dict(first.state_dict())
    again.write(0, 4)
    for epoch in range(3):
        again.on_epoch_end(epoch, 4)
    for e in range(4):
        a = sorted((tmp_path / "m" / f"epoch={e:05d}").glob("*.parquet"))
        b = sorted((tmp_path / "r" / f"epoch={e:05d}").glob("*.parquet"))
        assert [p.name for p in a] == [p.name for p in b] and a
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    # another keep is another run: refused on resume, naming the setting
    with pytest.raises(ValueError, match="keep"):
        Pruner(corpus, ScoreStore(n, fingerprint=corpus.fingerprint), RS2Policy(0.5, seed=5),
               str(tmp_path / "x")).load_state_dict(first.state_dict())
