"""`TrainingState`: everything a training run must save to resume exactly, as one object.

Every part follows one protocol, torchdata's (``torchdata.nodes`` / ``StatefulDataLoader``):
``state_dict()`` takes no argument and returns a ``torch.save``-able dict of tensors, numbers,
strings and containers of them (what ``torch.load(weights_only=True)`` reads back), and
``load_state_dict(state)`` puts the object back where it was. A composite nests its children's
states under fixed keys (``ReducibleLossSelector`` its ES selector's under ``"es"``; this class
each part's under its name). No selector's or pruner's state holds the score store: the store
is state of its own, saved once. :class:`TrainingState` bundles the
parts of an es-stream run — the :class:`ESDataset` (its place in the epoch, counted by
:func:`es_stream.loader`), the selector, the :class:`Pruner`, the model, the optimizer, any other
stateful object (an LR scheduler, a ``GradScaler``) and the random generators — so that, with
:class:`es_stream.Checkpointer`, a plain loop resumes in two lines::

    state = es.TrainingState(dataset=dataset, selector=selector, pruner=pruner, model=model,
                             optimizer=opt)
    step = checkpoints.restore(state)          # 0 when there is no checkpoint yet
    for epoch in range(dataset.epoch, epochs):  # the restored epoch, then the next ones
        ...
        checkpoints.save(step, state)

The score store (``selector.store``, else ``pruner.store``, or ``store=``) is saved once:
:meth:`TrainingState.state_dict` holds a copy of it under ``"store"`` (for small stores and
other checkpoint formats), while :class:`es_stream.Checkpointer` takes
:meth:`TrainingState.state_dict_without_store` and saves the store beside it chunk by chunk,
so a memory-mapped store of any size never passes through memory.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from .dataset import ESDataset
from .pruner import Pruner
from .store import ScoreStore

STORE, RNG = "store", "rng"


def _stateful(name: str, obj: Any) -> Any:
    """``obj``, checked to follow the state protocol."""
    if not (callable(getattr(obj, "state_dict", None)) and
            callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(f"TrainingState: {name} must have state_dict() and load_state_dict(), "
                        f"got {type(obj).__name__}")
    return obj


def rng_state() -> dict[str, Any]:
    """The global generators a training step may draw from (dropout, augmentations): torch's
    CPU generator, every CUDA device's when CUDA is initialised, numpy's and Python's; as
    tensors, numbers and tuples of them only, so a checkpoint loads with ``weights_only=True``.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, np.uint32).astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    """Set the generators :func:`rng_state` saved (CUDA's only when saved and present). A
    numpy state as ``np.random.get_state()`` returns it (older checkpoints) is accepted too."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"],
                       torch.as_tensor(numpy_state["key"]).numpy().astype(np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"cannot resume: the state holds {len(state['cuda'])} CUDA generator "
                             f"states and this machine has {torch.cuda.device_count()} devices; "
                             "build the TrainingState with rng=False to skip them")
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """The state of a training run, saved and restored as one (see the module docstring).

    Args (all keyword, all optional; give the parts the run has):
        dataset: the :class:`ESDataset`; its place in the current epoch is the number of
            meta-batches :func:`es_stream.loader` has yielded of it (a loop that iterates it
            some other way and counts itself reports its count to the dataset:
            ``dataset.track(es_stream.dataset.BatchCount(epoch, k))``, and counts in it).
        selector: an :class:`ESSelector` or any other selector.
        pruner: the :class:`Pruner` (its state only checks that a resumed run prunes alike).
        store: the :class:`ScoreStore`; default the selector's, else the pruner's.
        model, optimizer: saved with their own ``state_dict``.
        rng: save and restore the global random generators (default True), so dropout and
            augmentations draw the same numbers after a resume.
        **others: more stateful objects (``lr_scheduler=sched``, ``scaler=scaler``), saved
            under their keyword.

    :meth:`load_state_dict` needs a state with exactly these parts: a missing or extra part
    is a ``ValueError`` naming it (a checkpoint of another configuration is never half
    applied).
    """

    def __init__(self, *, dataset: ESDataset | None = None, selector: Any = None,
                 pruner: Pruner | None = None, store: ScoreStore | None = None,
                 model: torch.nn.Module | None = None, optimizer: Any = None,
                 rng: bool = True, **others: Any) -> None:
        if dataset is not None and not isinstance(dataset, ESDataset):
            raise TypeError(f"TrainingState: dataset must be an es_stream.ESDataset, got "
                            f"{type(dataset).__name__}")
        if pruner is not None and not isinstance(pruner, Pruner):
            raise TypeError(f"TrainingState: pruner must be an es_stream.Pruner, got "
                            f"{type(pruner).__name__}")
        if store is not None and not isinstance(store, ScoreStore):
            raise TypeError(f"TrainingState: store must be an es_stream.ScoreStore, got "
                            f"{type(store).__name__}")
        for reserved in (STORE, RNG):
            if reserved in others:
                raise TypeError(f"TrainingState: {reserved!r} is a reserved part name")
        self.dataset, self.selector, self.pruner = dataset, selector, pruner
        self.store = store if store is not None else self._default_store(selector, pruner)
        self.rng = bool(rng)
        # the pruner first: its load only checks, so a mismatch is refused before model and
        # optimizer change
        parts = {"pruner": pruner, "selector": selector, "model": model, "optimizer": optimizer,
                 **others}
        self.parts: dict[str, Any] = {name: _stateful(name, obj) for name, obj in parts.items()
                                      if obj is not None}

    @staticmethod
    def _default_store(selector: Any, pruner: Pruner | None) -> ScoreStore | None:
        stores = [s for s in (getattr(selector, "store", None), getattr(pruner, "store", None))
                  if isinstance(s, ScoreStore)]
        if len(stores) == 2 and stores[0] is not stores[1]:
            raise ValueError("TrainingState: the selector and the pruner hold different score "
                             "stores, so the pruner would not decide from the scores the "
                             "selector updates; give both the same store, or pass store= to "
                             "name the one to save")
        return stores[0] if stores else None

    def names(self) -> list[str]:
        """The parts a state of this object holds, but ``store``
        (:meth:`state_dict` adds it when there is a store)."""
        return (["dataset"] if self.dataset is not None else []) + list(self.parts) + (
            [RNG] if self.rng else [])

    def state_dict(self, *deprecated_args: Any, **deprecated: Any) -> dict[str, Any]:
        """Every part's state, by name, and a copy of the store's under ``"store"`` when there
        is a store (the one copy of the scores: no part's state holds them).

        ``state_dict(num_batches, with_store=...)`` is deprecated: the dataset's place is what
        :func:`es_stream.loader` counted (``dataset.state_at(k)`` for a count of your own), and
        :meth:`state_dict_without_store` leaves the scores out."""
        num_batches, with_store = self._deprecated(deprecated_args, deprecated)
        state = self.state_dict_without_store()
        if num_batches is not None:
            state["dataset"] = self.dataset.state_at(num_batches)
        if with_store and self.store is not None:
            state[STORE] = self.store.state_dict()
        return state

    def state_dict_without_store(self) -> dict[str, Any]:
        """:meth:`state_dict` without the scores, for a writer that saves the store on its own,
        chunk by chunk (:class:`es_stream.Checkpointer` does)."""
        state: dict[str, Any] = {}
        if self.dataset is not None:
            state["dataset"] = self.dataset.state_dict()
        for name, obj in self.parts.items():
            state[name] = obj.state_dict()
        if self.rng:
            state[RNG] = rng_state()
        return state

    def _deprecated(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
        """``(num_batches, with_store)`` from the deprecated arguments of :meth:`state_dict`."""
        unknown = sorted(set(kwargs) - {"num_batches", "with_store"})
        if len(args) > 1 or unknown or (args and "num_batches" in kwargs):
            raise TypeError(f"TrainingState.state_dict() takes no arguments, got {len(args)} "
                            f"positional and {sorted(kwargs)}")
        if not args and not kwargs:
            return None, True
        warnings.warn("TrainingState.state_dict(num_batches, with_store=...) is deprecated: call "
                      "state_dict() (the dataset's place as es_stream.loader counted it), or "
                      "state_dict_without_store() to leave the scores out",
                      DeprecationWarning, stacklevel=3)
        num_batches = args[0] if args else kwargs.get("num_batches")
        if num_batches is not None and self.dataset is None:
            raise ValueError("TrainingState.state_dict(num_batches): there is no dataset part")
        return num_batches, bool(kwargs.get("with_store", True))

    def check_parts(self, state: Any, where: str = "the state") -> None:
        """Raise unless ``state`` holds exactly this object's parts (``ValueError`` naming the
        missing and unexpected ones, ``TypeError`` for a state that is not a dict)."""
        if not isinstance(state, dict):
            raise TypeError(f"{where}: expected the dict TrainingState.state_dict returns, got "
                            f"{type(state).__name__}")
        mine = set(self.names())
        held = set(state) - {STORE}
        if mine != held:
            lacking, unknown = sorted(mine - held), sorted(held - mine)
            raise ValueError(
                f"cannot resume from {where}: it holds the parts {sorted(held)}, this "
                f"TrainingState has {sorted(mine)}"
                + (f"; the state lacks {lacking}" if lacking else "")
                + (f"; this TrainingState lacks {unknown}" if unknown else "")
                + ": build the TrainingState with the same parts as the run that saved it")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part from :meth:`state_dict`'s output (the scores too when the state
        holds them; :meth:`es_stream.Checkpointer.restore` restores them from beside it)."""
        self.check_parts(state)
        if self.dataset is not None:  # checks every field before it changes anything
            self.dataset.load_state_dict(state["dataset"])
        if STORE in state:
            if self.store is None:
                raise ValueError("cannot resume: the state holds scores but this TrainingState "
                                 "has no store; pass store= (or the selector / pruner that "
                                 "holds it)")
            self.store.load_state_dict(state[STORE])
        for name, obj in self.parts.items():
            obj.load_state_dict(state[name])
        if self.rng:
            load_rng_state(state[RNG])

    def __repr__(self) -> str:
        store = "" if self.store is None else f", store={self.store.num_samples} scores"
        return f"TrainingState({', '.join(self.names())}{store})"
