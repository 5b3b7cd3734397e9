"""The state contract, checked on every stateful class of es_stream (found by walking the
package, so a new class is checked, or this test fails until it is given a builder):

* ``state_dict()`` takes no argument (deprecated arguments only through ``*deprecated_args`` /
  ``**deprecated``);
* a round trip (``load_state_dict(state_dict())`` on a fresh object) restores an equal state,
  and the state loads with ``torch.load(weights_only=True)`` (no code from the file);
* no selector's, pruner's or other part's state holds the score store (the store's own state
  and the TrainingState that nests it aside), and a Checkpointer checkpoint holds it once,
  beside the state, never inside ``state.pt``.
"""

from __future__ import annotations

import importlib
import inspect
import io
import itertools
import math
import os
import pkgutil

import numpy as np
import pytest
import torch

import es_stream
from es_stream import (Checkpointer, Corpus, ESDataset, ESSelector, ESWPPolicy, LossSelector,
                       Pruner, ReducibleLossSelector, ScoreStore, SelectiveBackpropSelector,
                       Selector, TopKSelector, TrainingState, UniformSelector)
from es_stream.dedup_parts import PendingDataset
from es_stream.distributed import UpdateLog
from es_stream.metrics import SelectionStats, _Reservoir
from es_stream.mixing import MixedDataset
from es_stream.store import MappedScoreStore, MemoryScoreStore

N = 3000  # the selectors' store: larger than anything else a state holds
B, b = 16, 4

# classes whose state_dict follows another library's protocol, not this one
EXEMPT = {
    "ESStreamingDataset": "mosaicml-streaming's StreamingDataset protocol: Composer calls "
                          "state_dict(num_samples, from_beginning)",
}
# the only parameters a state_dict may have: the route for deprecated arguments
DEPRECATED = {"deprecated_args", "deprecated"}


def stateful_classes() -> dict[str, type]:
    """Every class defined in an es_stream module with state_dict and load_state_dict; modules
    that need an optional extra not installed here are left out."""
    found = {}
    for info in pkgutil.walk_packages(es_stream.__path__, "es_stream."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an integration whose framework is not installed
            continue
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__
                    and callable(getattr(cls, "state_dict", None))
                    and callable(getattr(cls, "load_state_dict", None))):
                found[f"{module.__name__}.{name}"] = cls
    return found


CLASSES = stateful_classes()


def test_the_walk_finds_the_stateful_classes():
    names = {cls.__name__ for cls in CLASSES.values()}
    # a sample of what must be there: if the walk breaks, this test says so
    assert {"ESSelector", "ReducibleLossSelector", "Pruner", "TrainingState", "ESDataset",
            "MemoryScoreStore", "MappedScoreStore", "UpdateLog", "SelectionStats"} <= names


@pytest.mark.parametrize("qualname", sorted(CLASSES))
def test_state_dict_takes_no_argument(qualname):
    cls = CLASSES[qualname]
    if cls.__name__ in EXEMPT:
        pytest.skip(EXEMPT[cls.__name__])
    params = list(inspect.signature(cls.state_dict).parameters.values())[1:]  # after self
    for p in params:
        assert p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name in DEPRECATED, (
            f"{qualname}.state_dict has parameter {p.name!r}: the contract is state_dict() with "
            "no argument (deprecated ones only through *deprecated_args / **deprecated)")
    params = list(inspect.signature(cls.load_state_dict).parameters.values())[1:]
    assert len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                   params[0].POSITIONAL_OR_KEYWORD), (
        f"{qualname}.load_state_dict must take exactly one argument, the state")


# ------------------------------------------------------------------ builders
def _meta_batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randperm(N, generator=gen)[:B], torch.rand(B, generator=gen) * 3)
            for _ in range(steps)]


def _select(selector, steps=3):
    for ids, losses in _meta_batches(steps):
        selector.select(ids, losses)


@pytest.fixture
def corpus(wds_dir):
    return Corpus.from_webdataset(str(wds_dir))


@pytest.fixture
def reference():
    store = ScoreStore(N)
    store.write_range(0, np.random.default_rng(1).random(N, dtype=np.float32))
    return store


@pytest.fixture
def builders(corpus, reference, tmp_path):
    """Class name -> (make a fresh object, advance it so its state differs from a fresh one's)."""
    files = itertools.count()

    def dataset():
        return ESDataset(corpus, 8, seed=3)

    def drive_dataset(ds):
        it = iter(ds)  # iterated in this process: it counts what it hands out
        next(it), next(it)

    def mixed():
        return MixedDataset([ESDataset(corpus, 8, seed=3), ESDataset(corpus, 8, seed=5)],
                            [0.7, 0.3], seed=3)

    def pruner():
        store = ScoreStore(corpus.num_samples)
        return Pruner(corpus, store, ESWPPolicy(ratio=0.3, anneal=0.25, burn_in_epochs=1),
                      tmp_path / "manifests")

    def drive_log(log):
        log.load_ids(torch.tensor([7, 3]))
        log.record(torch.tensor([3, 11]))

    def drive_store(store):
        store.scatter(torch.tensor([1, 2, 5]), torch.tensor([0.5, 0.0, 2.0]))

    def training_state():
        return TrainingState(selector=ESSelector(N, b, seed=4, fresh_steps=2), rng=True)

    def drive_stats(stats):
        stats.observe(samples=B, selected=b, uniform=False, scores=torch.rand(B),
                      weights=torch.rand(b), never_scored=torch.rand(B) > 0.5)

    def drive_base(selector):
        selector.step = 3

    return {
        "ESDataset": (dataset, drive_dataset),
        "PendingDataset": (lambda: PendingDataset(corpus, 8, seed=3), drive_dataset),
        "MixedDataset": (mixed, drive_dataset),
        "UpdateLog": (UpdateLog, drive_log),
        "_Reservoir": (lambda: _Reservoir(8, seed=1), lambda r: r.add(torch.rand(20))),
        "SelectionStats": (lambda: SelectionStats(seed=1), drive_stats),
        "Pruner": (pruner, lambda p: None),  # its state is what decides: checked, not changed
        "Selector": (lambda: Selector(b, seed=2), drive_base),
        "UniformSelector": (lambda: UniformSelector(b, seed=2), _select),
        "LossSelector": (lambda: LossSelector(b, seed=2), _select),
        "TopKSelector": (lambda: TopKSelector(b, seed=2), _select),
        "SelectiveBackpropSelector": (lambda: SelectiveBackpropSelector(b, seed=2), _select),
        "ESSelector": (lambda: ESSelector(N, b, seed=2, fresh_steps=2, reweight="unbiased"),
                       _select),
        "ReducibleLossSelector": (lambda: ReducibleLossSelector(reference, b, rule="es", seed=2),
                                  _select),
        "TrainingState": (training_state, lambda s: _select(s.selector)),
        "ScoreStore": (lambda: ScoreStore(N), drive_store),
        "MemoryScoreStore": (lambda: MemoryScoreStore(N), drive_store),
        "MappedScoreStore": (lambda: ScoreStore.open(tmp_path / f"s{next(files)}.npy", N),
                             drive_store),
    }


def _equal(a, b, where="state"):
    """Assert two states equal, tensors and arrays by value (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        x, y = torch.as_tensor(a), torch.as_tensor(b)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{where}: {x.dtype}{tuple(x.shape)}"
        assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.nan_to_num(7.5),
                                                                           y.nan_to_num(7.5))), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _store_copies(state, n, where="state"):
    """Where ``state`` holds a score store or a float vector of a store's size ``n``."""
    if isinstance(state, ScoreStore):
        return [where]
    if isinstance(state, dict):
        return [w for k, v in state.items()
                for w in ([f"{where}[{k!r}]"] if k == "store" else []) + _store_copies(v, n, f"{where}[{k!r}]")]
    if isinstance(state, (list, tuple)):
        return [w for i, v in enumerate(state) for w in _store_copies(v, n, f"{where}[{i}]")]
    if isinstance(state, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(state)
        return [where] if t.is_floating_point() and t.numel() >= n else []
    return []


def _through_a_file(state):
    """``state`` saved and read back as a checkpoint reads it: nothing but safe types."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("qualname", sorted(q for q, c in CLASSES.items()
                                            if not q.startswith("es_stream.integrations.")))
def test_round_trip_restores_an_equal_state_with_no_store_inside(qualname, builders):
    cls = CLASSES[qualname]
    if cls.__name__ in EXEMPT:
        pytest.skip(EXEMPT[cls.__name__])
    assert cls.__name__ in builders, (
        f"{qualname} is stateful but has no builder here: add one, so the contract is checked")
    make, drive = builders[cls.__name__]
    original = make()
    drive(original)
    state = original.state_dict()
    assert isinstance(state, dict), f"{qualname}.state_dict() must return a dict"
    fresh = make()
    fresh.load_state_dict(_through_a_file(state))
    _equal(fresh.state_dict(), state, f"{cls.__name__} state")
    if isinstance(original, ScoreStore):
        return  # the store's own state is its scores
    copies = _store_copies(state, N)
    if isinstance(original, TrainingState):
        # the one copy of the scores, nested under "store"; none without it
        assert copies == ["state['store']", "state['store']['scores']"]
        assert _store_copies(original.state_dict_without_store(), N) == []
    else:
        assert copies == [], f"{qualname}: the state holds a score store at {copies}"


def test_a_selector_state_never_holds_the_store_reproduction(reference):
    """The reported case: ReducibleLossSelector(rule="es") nested its ES store into the state."""
    selector = ReducibleLossSelector(reference, 8, rule="es")
    _select(selector)
    state = TrainingState(selector=selector)
    assert "store" not in state.state_dict_without_store()["selector"]["es"]
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old_call = state.state_dict(with_store=False)
    assert "store" not in old_call["selector"]["es"] and "store" not in old_call
    full = state.state_dict()
    assert "store" not in full["selector"]["es"]
    np.testing.assert_array_equal(full["store"]["scores"].numpy(), selector.store.to_numpy())


def test_a_checkpoint_holds_the_store_once_beside_the_state(tmp_path):
    n = 50_000  # 200 KB of scores: more than everything else the state holds
    reference = ScoreStore(n)
    reference.write_range(0, np.random.default_rng(1).random(n, dtype=np.float32))
    selector = ReducibleLossSelector(reference, 8, rule="es", seed=5)
    batches = _meta_batches(6, seed=9)
    for ids, losses in batches[:3]:
        selector.select(ids, losses)
    ckpt = Checkpointer(tmp_path / "ckpt")
    step_dir = ckpt.save(3, TrainingState(selector=selector))
    # state.pt: read as the checkpointer reads it, and searched for any copy of the store
    saved = torch.load(os.path.join(step_dir, "state.pt"), weights_only=True)
    assert _store_copies(saved, n) == []
    assert os.path.getsize(os.path.join(step_dir, "state.pt")) < 4 * n  # not even one copy fits
    np.testing.assert_array_equal(np.load(os.path.join(step_dir, "scores.npy")),
                                  selector.store._read_raw(0, n))  # the store, once, beside
    # and the checkpoint still resumes exactly
    resumed = ReducibleLossSelector(reference, 8, rule="es", seed=77)
    assert Checkpointer(tmp_path / "ckpt").restore(TrainingState(selector=resumed)) == 3
    np.testing.assert_array_equal(resumed.store.to_numpy(), selector.store.to_numpy())
    for ids, losses in batches[3:]:
        assert resumed.select(ids, losses).tolist() == selector.select(ids, losses).tolist()
