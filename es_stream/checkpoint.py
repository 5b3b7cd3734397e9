"""`Checkpointer`: training state and score store saved together, so that a run killed at any
moment (SIGKILL, OOM killer, preemption) resumes from the last complete checkpoint.

Layout::

    directory/step-SSSSSSSSSSSS/scores.npy   the score store (ScoreStore.save), if one is given
    directory/step-SSSSSSSSSSSS/scores.meta.json   its metadata (corpus fingerprint), beside it
    directory/step-SSSSSSSSSSSS/state.pt     torch.save of the state dict
    directory/latest                         one line: the name of the committed step directory

Why ``latest`` is the commit point: a checkpoint is two files (scores and state) written one
after the other, and no file system replaces two files at once. Each file is written atomically
(a temporary file, fsynced, renamed over the target), and only when both are complete — and the
new directory's entry is durable — is ``latest`` atomically replaced to name the new step
directory. Readers (:meth:`Checkpointer.latest`, :meth:`Checkpointer.load`) look only at what
``latest`` names, so they see the previous checkpoint or the new one, never a mix.

What survives a SIGKILL at any moment of :meth:`Checkpointer.save`: the checkpoint ``latest``
named before the call, whole (its files are never written again). Before ``latest`` is replaced
the new checkpoint does not exist for readers; after, it is whole. What a kill can leave behind —
temporary files, a half-written ``step-*`` directory newer than ``latest``, a directory half-way
through deletion (renamed to ``.trash-*`` first, so it never looks like a checkpoint) — is
ignored by readers and removed by the next :meth:`Checkpointer.save`. (Power loss as well: every
file and directory entry is fsynced before ``latest`` names it.)

One writer per directory (rank 0 under ``torch.distributed``); steps must increase, so a
committed checkpoint is never rewritten in place.

**No code from the file.** ``state.pt`` is read with ``torch.load(weights_only=True)``: tensors,
numbers, strings and containers of them, never an object whose unpickling runs code, so a
checkpoint received from someone else cannot run theirs. Every es-stream state is of that kind
(:class:`es_stream.TrainingState`). A checkpoint holding other objects is refused, naming the
file; ``weights_only=False`` (:meth:`Checkpointer.load`, :meth:`Checkpointer.restore`) reads
it, for files you trust only.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from typing import Any

import torch

from .atomic import atomic_write, fsync_path
from ._check import int_at_least
from .errors import ScoreError
from .state import TrainingState
from .store import ScoreStore, saved_length

LATEST = "latest"
SCORES = "scores.npy"
STATE = "state.pt"
_STEP_DIR = re.compile(r"step-(\d{12})")


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(exc: BaseException) -> str:
    """The gist of an unpickling error: its first non-empty line after torch's preamble."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _step_name(step: int) -> str:
    return f"step-{step:012d}"


class Checkpointer:
    """Saves ``(step, state, store)`` checkpoints under ``directory``, keeping the ``keep``
    newest; see the module docstring for the layout and what survives a crash.

    ``state`` is an :class:`es_stream.TrainingState` — dataset, selector, pruner, model,
    optimizer and store saved and restored together, so a plain loop resumes with
    ``step = checkpoints.restore(state)`` — or any ``torch.save``-able dict: e.g.
    ``{"model": model.state_dict(), "optim": optim.state_dict(), "selector":
    selector.state_dict()}``, with the score store given separately. Either way
    the store is saved beside the state chunk by chunk, so a memory-mapped store of any size is
    never copied into memory; :meth:`restore` / :meth:`load` restore it the same way.

    Args:
        directory: where the ``step-<N>`` checkpoints and the ``latest`` pointer go.
        keep: how many of the newest committed steps to keep (default 2: the one ``latest``
            names, and the one before it in case the newest turns out to be bad); each
            :meth:`save` deletes the older ``step-*`` directories under ``directory`` beyond
            that. At least 1.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        self.keep = int_at_least(keep, 1, "keep")
        self.directory = os.fspath(directory)

    # ------------------------------------------------------------- reading
    def _committed(self) -> tuple[int, str] | None:
        """(step, name) that ``latest`` names, None if there is no ``latest``."""
        path = os.path.join(self.directory, LATEST)
        try:
            with open(path, "rb") as f:
                # bytes, decoded leniently: a garbage file is reported below, naming it
                name = f.read(4096).decode("utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        m = _STEP_DIR.fullmatch(name)
        if m is None:
            raise ValueError(f"{path}: expected the name of a step directory "
                             f"(step-<12 digits>), got {name[:80]!r}; the file was not written "
                             "by Checkpointer — delete it to start over")
        if not os.path.isdir(os.path.join(self.directory, name)):
            raise FileNotFoundError(
                f"{path}: names {name}, which does not exist in {self.directory}; the checkpoint "
                f"directory was removed or moved — put {name} back, or delete {path} to start "
                "training from scratch (older step-* directories, if any, can be named in it)")
        return int(m.group(1)), name

    def latest(self) -> str | None:
        """The committed step directory, or None when there is no checkpoint yet."""
        committed = self._committed()
        return None if committed is None else os.path.join(self.directory, committed[1])

    def load(self, store: ScoreStore | None = None, map_location: Any = "cpu",
             weights_only: bool = True) -> tuple[int, dict] | None:
        """Read the committed checkpoint: returns ``(step, state)``, None when there is none.

        With ``store``, its scores are replaced by the checkpoint's (chunk by chunk). The state
        is read with ``weights_only=True`` (tensors, numbers, strings, containers: nothing in
        the file runs code); a state holding other objects is refused with a ``ValueError``
        naming the file. ``weights_only=False`` unpickles anything: only for a file you trust.
        """
        committed = self._committed()
        if committed is None:
            return None
        step, name = committed
        step_dir = os.path.join(self.directory, name)
        state_path = os.path.join(step_dir, STATE)
        if not os.path.exists(state_path):
            raise FileNotFoundError(f"{state_path}: missing from the committed checkpoint; the "
                                    "directory was modified after it was saved")
        try:
            state = torch.load(state_path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            # torch's safe unpickler names the first global it refused; anything else it
            # refuses is a damaged file, reported below
            refused = _REFUSED_GLOBAL.search(str(exc)) if weights_only else None
            if refused is None:
                raise ValueError(f"{state_path}: cannot be read as a checkpoint state "
                                 f"({type(exc).__name__}: {_first_line(exc)}); "
                                 f"{self._damaged(name)}") from exc
            raise ValueError(
                f"{state_path}: refused: it holds {refused.group(1)}, not only tensors, numbers, "
                "strings and containers of them, and loading it would run code from the file; if "
                "you trust this file, load it with weights_only=False "
                "(Checkpointer.load(..., weights_only=False) or "
                "Checkpointer.restore(state, weights_only=False))") from exc
        except Exception as exc:  # unpickling garbage raises anything from EOFError to KeyError
            raise ValueError(f"{state_path}: cannot be read as a checkpoint state "
                             f"({type(exc).__name__}: {exc}); {self._damaged(name)}") from exc
        if store is not None:
            self._restore_store(name, store)
        return step, state

    def _restore_store(self, name: str, store: ScoreStore) -> None:
        """Replace ``store``'s scores by those of checkpoint ``name``."""
        scores = os.path.join(self.directory, name, SCORES)
        if not os.path.exists(scores):
            raise FileNotFoundError(f"{scores}: this checkpoint holds no scores (saved "
                                    "without a store); load it without store=")
        try:
            held, _ = saved_length(scores)
        except ScoreError as exc:
            raise ScoreError(f"{exc}; {self._damaged(name)}") from exc
        if held != store.num_samples:
            raise ValueError(f"{scores}: holds {held} scores, the store has "
                             f"{store.num_samples}: a checkpoint of another corpus?")
        store.restore(scores)

    def restore(self, state: TrainingState, map_location: Any = "cpu", *,
                weights_only: bool = True) -> int:
        """Put every part of ``state`` back as the committed checkpoint has it (scores from
        beside the state, into ``state.store``) and return its step; with no checkpoint yet,
        change nothing and return 0, so ``step = checkpoints.restore(state)`` starts and
        resumes alike. A checkpoint whose parts differ from ``state``'s is refused
        (``ValueError`` naming them) before anything is touched. ``weights_only``: as
        :meth:`load` (False only for a file you trust)."""
        if not isinstance(state, TrainingState):
            raise TypeError(f"restore needs an es_stream.TrainingState, got {type(state).__name__}; "
                            "for a plain dict state use load()")
        loaded = self.load(map_location=map_location, weights_only=weights_only)
        if loaded is None:
            return 0
        step, saved = loaded
        name = os.path.basename(self.latest())
        state.check_parts(saved, where=os.path.join(self.directory, name, STATE))
        if state.store is not None:
            self._restore_store(name, state.store)
        state.load_state_dict(saved)
        return step

    def _damaged(self, name: str) -> str:
        """What to do about a damaged committed checkpoint ``name``."""
        older = [n for _, n in self._steps() if n < name]
        fallback = (f"write the name of an older step directory ({', '.join(older)}) into "
                    f"{os.path.join(self.directory, LATEST)} to resume from it, or " if older else "")
        return (f"the checkpoint {name} is damaged: {fallback}delete "
                f"{os.path.join(self.directory, LATEST)} to train from scratch")

    # ------------------------------------------------------------- writing
    def save(self, step: int, state: dict | TrainingState, store: ScoreStore | None = None) -> str:
        """Write checkpoint ``step``, commit it by replacing ``latest``, then drop checkpoints
        beyond the ``keep`` newest. Returns the new step directory. With a
        :class:`~es_stream.TrainingState`, its store is the one saved (``store`` must be
        omitted) and the dataset's place is what :func:`es_stream.loader` yielded so far."""
        step = int_at_least(step, 0, "step", "a non-negative integer")
        if isinstance(state, TrainingState):
            if store is not None:
                raise TypeError("Checkpointer.save: a TrainingState saves its own store; omit "
                                "store= (or pass store= to the TrainingState)")
            state, store = state.state_dict_without_store(), state.store
        os.makedirs(self.directory, exist_ok=True)
        committed = self._committed()
        if committed is not None and step <= committed[0]:
            raise ValueError(f"step {step}: {os.path.join(self.directory, LATEST)} already "
                             f"commits step {committed[0]}; steps must increase (a committed "
                             "checkpoint is never rewritten) — use another directory to start "
                             "over")
        self._clean(committed[0] if committed is not None else None)
        name = _step_name(step)
        step_dir = os.path.join(self.directory, name)
        os.makedirs(step_dir)
        if store is not None:
            store.save(os.path.join(step_dir, SCORES))
        with atomic_write(os.path.join(step_dir, STATE)) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
        fsync_path(self.directory)  # the step directory's entry, before latest names it
        with atomic_write(os.path.join(self.directory, LATEST)) as tmp:
            with open(tmp, "w") as f:
                f.write(name + "\n")
        self._prune()
        return step_dir

    def _steps(self) -> list[tuple[int, str]]:
        out = []
        for entry in os.listdir(self.directory):
            m = _STEP_DIR.fullmatch(entry)
            if m is not None and os.path.isdir(os.path.join(self.directory, entry)):
                out.append((int(m.group(1)), entry))
        return sorted(out)

    def _remove(self, name: str) -> None:
        # renamed first, so a kill half-way through the deletion never leaves a partial step-*
        trash = os.path.join(self.directory, f".trash-{name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(os.path.join(self.directory, name), trash)
        shutil.rmtree(trash)

    def _clean(self, committed: int | None) -> None:
        """Remove what earlier interrupted saves left: step directories newer than the committed
        one (never named by ``latest``), directories half-deleted, temporary files."""
        for step, name in self._steps():
            if committed is None or step > committed:
                self._remove(name)
        for entry in os.listdir(self.directory):
            path = os.path.join(self.directory, entry)
            if entry.startswith(".trash-step-"):
                shutil.rmtree(path, ignore_errors=True)
            elif entry.startswith(f".{LATEST}.") and entry.endswith(".tmp"):
                os.unlink(path)

    def _prune(self) -> None:
        steps = self._steps()
        for _, name in steps[:max(0, len(steps) - self.keep)]:
            self._remove(name)
