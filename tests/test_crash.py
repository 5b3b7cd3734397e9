"""Crash safety with real processes: a child writes manifests, a score store or a checkpoint
and is SIGKILLed at a deterministic point; the previous complete state must still read back
exactly, the interrupted one must be refused (never half-read), and rerunning the child must
produce exactly what an uninterrupted run produces.

Kill points come from fault injection in the child (``ES_FAULT=kind:match:n``): ``replace``
kills just before the n-th ``os.replace`` onto a file whose name contains ``match`` (the
temporary file is complete, the target not yet replaced); ``write`` writes half of the n-th
``write`` to a temporary file whose name contains ``match``, then kills (a torn file; for
Parquet, pyarrow's own writer, the finished temporary file is cut in half instead).

To keep this quick on two cores the child processes run two at a time, once for the whole
module: per scenario one run prepares the previous state (``base``) and the reference
(``ref``: base plus the uninterrupted next step), each kill point gets one killed run on a copy
of ``base``, and one run per scenario redoes the step on a copy of every killed directory.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from es_stream import Checkpointer, Corpus, ManifestError, ScoreStore
from es_stream.manifest import list_epochs, read_epoch
from conftest import write_wds

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import builtins, os, shutil, signal, sys

spec = os.environ.get("ES_FAULT")
if spec:
    kind, match, nth = spec.split(":")
    nth, seen = int(nth), [0]

    def hit(path):
        if match in os.path.basename(os.fspath(path)):
            seen[0] += 1
            return seen[0] == nth
        return False

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "replace":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if hit(dst):
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind == "write":
        real_open = builtins.open

        class Torn:
            def __init__(self, f, path):
                self._f, self._path = f, path

            def write(self, data):
                if hit(self._path):
                    part = data if isinstance(data, str) else memoryview(data).cast("B")
                    self._f.write(part[:len(part) // 2])
                    self._f.flush()
                    die()
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
                    and os.fspath(file).endswith(".tmp")):
                return Torn(f, file)
            return f

        builtins.open = open_
        import pyarrow.parquet as pq
        real_write_table = pq.write_table

        def write_table(table, where, *args, **kwargs):
            real_write_table(table, where, *args, **kwargs)
            if isinstance(where, str) and hit(where):
                os.truncate(where, os.path.getsize(where) // 2)
                die()

        pq.write_table = write_table
    else:
        raise SystemExit(f"unknown fault kind {kind!r}")

import numpy as np
import torch
from es_stream import Checkpointer, Corpus, ESSelector, ESWPPolicy, Pruner, ScoreStore

N, B, b = 1000, 32, 8


def manifests(work, phase, corpus):
    epoch = 2 if phase == "2old" else int(phase)
    seed = 20 if phase == "2old" else epoch
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(corpus.num_samples), torch.from_numpy(
        np.random.default_rng(seed).random(corpus.num_samples).astype(np.float32)))
    Pruner(corpus, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           os.path.join(work, "out")).write(epoch, total_epochs=4)


def store(work, phase):
    s = ScoreStore.open(os.path.join(work, "live.npy"), N)
    rng = np.random.default_rng(int(phase))
    ids = torch.from_numpy(rng.permutation(N)[:N // 2])
    s.scatter(ids, torch.from_numpy(rng.random(N // 2).astype(np.float32)))
    s.save(os.path.join(work, "out", "scores.npy"))


def checkpoint(work, phase):
    s = ScoreStore.open(os.path.join(work, "live.npy"), N)
    sel = ESSelector(N, b, store=s, seed=0)
    ckpt = Checkpointer(os.path.join(work, "ckpt"))
    resumed = ckpt.load(s)
    step, chosen = 0, []
    if resumed is not None:
        step, state = resumed
        sel.load_state_dict(state["selector"])
        chosen = state["chosen"]
    for k in range(step, 4 * int(phase)):  # each phase: 4 more steps, then a checkpoint
        rng = np.random.default_rng(k)
        ids = torch.from_numpy(rng.permutation(N)[:B])
        losses = torch.from_numpy(rng.random(B).astype(np.float32))
        chosen.append(ids[sel.select(ids, losses)].tolist())
    ckpt.save(4 * int(phase), {"selector": sel.state_dict(), "chosen": chosen}, s)


scenario, corpus_dir = sys.argv[1], sys.argv[2]
corpus = Corpus.from_webdataset(corpus_dir) if scenario.startswith("manifests") else None
for step in sys.argv[3:]:  # DIR=PHASE runs a phase in DIR; DIR<SRC copies SRC to DIR
    if "<" in step:
        dst, src = step.split("<")
        shutil.copytree(src, dst)
        continue
    work, phase = step.split("=")
    os.makedirs(os.path.join(work, "out"), exist_ok=True)
    if scenario.startswith("manifests"):
        manifests(work, phase, corpus)
    else:
        {"store": store, "checkpoint": checkpoint}[scenario](work, phase)
'''

# scenario -> what base holds before the interrupted step, then that step
PREPARE = {
    "manifests": ["base=1"],                   # epoch 1 complete, then epoch 2 written
    "manifests_rewrite": ["base=1", "base=2old"],  # epoch 2 complete (older scores), rewritten
    "store": ["base=1"],                       # scores saved, then saved again over them
    "checkpoint": ["base=1"],                  # checkpoint at step 4, then step 8
}
STEP = "2"

KILLS = [  # (scenario, fault)
    ("manifests", "replace:shard=00000:1"),     # first shard's file done, not yet in place
    ("manifests", "write:shard=00002:1"),       # two shards in, the third torn
    ("manifests", "replace:shard=00003:1"),     # three shards in
    ("manifests", "replace:_SUCCESS:1"),        # every shard in, the marker not
    ("manifests_rewrite", "replace:shard=00002:1"),  # two new shards beside three old ones
    ("store", "write:scores.npy:1"),            # torn .npy header
    ("store", "write:scores.npy:2"),            # torn data
    ("store", "replace:scores.npy:1"),          # whole file written, not yet in place
    ("checkpoint", "write:scores.npy:2"),       # while writing the store
    ("checkpoint", "write:state.pt:2"),         # while writing the state
    ("checkpoint", "replace:latest:1"),         # everything written, just before the commit
]
IDS = [f"{s}-{f.replace(':', '-')}" for s, f in KILLS]


def _run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("ES_FAULT", None)
    if fault:
        env["ES_FAULT"] = fault
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    child = root / "child.py"
    child.write_text(CHILD)
    corpus_dir = root / "corpus"
    write_wds(corpus_dir)
    d = {s: root / s for s in PREPARE}
    pool = ThreadPoolExecutor(2)

    def prepare(s):
        return _run([str(child), s, str(corpus_dir), *[f"{d[s]}/{p}" for p in PREPARE[s]],
                     f"{d[s]}/ref<{d[s]}/base", f"{d[s]}/ref={STEP}"])

    for s, proc in zip(PREPARE, pool.map(prepare, PREPARE)):
        _check(proc, f"preparing {s}")

    def killed(i):
        s, fault = KILLS[i]
        shutil.copytree(d[s] / "base", d[s] / f"crash{i}")
        return _run([str(child), s, str(corpus_dir), f"{d[s]}/crash{i}={STEP}"], fault)

    results = list(pool.map(killed, range(len(KILLS))))
    for i, (s, _) in enumerate(KILLS):  # crash{i} stays as the kill left it, for the checks
        shutil.copytree(d[s] / f"crash{i}", d[s] / f"rerun{i}")

    def rerun(s):
        return _run([str(child), s, str(corpus_dir),
                     *[f"{d[s]}/rerun{i}={STEP}" for i, (t, _) in enumerate(KILLS) if t == s]])

    for s, proc in zip(PREPARE, pool.map(rerun, PREPARE)):
        _check(proc, f"rerunning {s}")
    pool.shutdown()
    return {"dirs": d, "killed": results,
            "corpus": Corpus.from_webdataset(str(corpus_dir))}


def _files(directory: Path) -> dict[str, Path]:
    return {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*")) if p.is_file()}


def _leftovers(names) -> list[str]:
    return [n for n in names if os.path.basename(n).startswith(".") and n.endswith(".tmp")]


def _same_bytes(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    left = _leftovers(set(fa) - set(fb))
    # atomic_write's temporary files orphaned by the kill: readers never look at them
    assert set(fa) - set(left) == set(fb), (sorted(fa), sorted(fb))
    for name, path in fb.items():
        assert filecmp.cmp(fa[name], path, shallow=False), f"{name} differs from the reference"


def _epoch(out: Path, corpus: Corpus, epoch: int):
    return read_epoch(out, epoch, corpus.fingerprint, [s.num_samples for s in corpus.shards])


@pytest.mark.parametrize("i", range(len(KILLS)), ids=IDS)
def test_killed_then_rerun(runs, i):
    scenario, fault = KILLS[i]
    proc = runs["killed"][i]
    assert proc.returncode == -signal.SIGKILL, (
        f"the child was not killed at {fault} (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    d = runs["dirs"][scenario]
    base, ref, crash, rerun = d / "base", d / "ref", d / f"crash{i}", d / f"rerun{i}"

    if scenario.startswith("manifests"):
        corpus = runs["corpus"]
        out = crash / "out"
        # the complete epoch reads back exactly; the interrupted one is refused, not half-read
        assert list_epochs(out) == [1]
        got, want = _epoch(out, corpus, 1), _epoch(ref / "out", corpus, 1)
        np.testing.assert_array_equal(got.kept_ids, want.kept_ids)
        assert filecmp.dircmp(out / "epoch=00001", base / "out" / "epoch=00001").diff_files == []
        with pytest.raises(ManifestError, match=r"epoch=00002: no _SUCCESS marker"):
            _epoch(out, corpus, 2)
        # the rerun finishes epoch 2 exactly as an uninterrupted run did, bit for bit
        _same_bytes(rerun / "out", ref / "out")
        for e in (1, 2):
            got, want = _epoch(rerun / "out", corpus, e), _epoch(ref / "out", corpus, e)
            np.testing.assert_array_equal(got.kept_ids, want.kept_ids)
        as_table = lambda o: pads.dataset(str(o), partitioning="hive").to_table()  # noqa: E731
        assert as_table(rerun / "out").equals(as_table(ref / "out"))

    elif scenario == "store":
        saved = crash / "out" / "scores.npy"
        # the previous file is whole: same bytes, same scores
        assert filecmp.cmp(saved, base / "out" / "scores.npy", shallow=False)
        np.testing.assert_array_equal(ScoreStore.load(saved).to_numpy(),
                                      ScoreStore.load(base / "out" / "scores.npy").to_numpy())
        _same_bytes(rerun / "out", ref / "out")

    else:  # checkpoint
        ckpt, n = Checkpointer(crash / "ckpt"), 1000
        assert ckpt.latest() == str(crash / "ckpt" / "step-000000000004")
        store = ScoreStore(n)
        step, state = ckpt.load(store)
        base_step, base_state = Checkpointer(base / "ckpt").load()
        assert step == base_step == 4 and state["chosen"] == base_state["chosen"]
        assert state["selector"]["step"] == 4
        for key, gen in base_state["selector"]["generators"].items():
            assert torch.equal(state["selector"]["generators"][key], gen)
        before = ScoreStore.load(base / "ckpt" / "step-000000000004" / "scores.npy")
        np.testing.assert_array_equal(store.to_numpy(), before.to_numpy())
        # the rerun resumes from step 4 and writes the step-8 checkpoint of the uninterrupted run;
        # the killed save's leftovers are gone
        assert _files(rerun / "ckpt").keys() == _files(ref / "ckpt").keys()
        _same_bytes(rerun / "ckpt", ref / "ckpt")  # state.pt included: torch.save is deterministic
        got, want = (Checkpointer(x / "ckpt").load() for x in (rerun, ref))
        assert got[0] == want[0] == 8 and got[1]["chosen"] == want[1]["chosen"]
        assert len(got[1]["chosen"]) == 8
        for key, gen in want[1]["selector"]["generators"].items():
            assert torch.equal(got[1]["selector"]["generators"][key], gen)
