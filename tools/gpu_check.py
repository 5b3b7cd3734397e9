"""Every GPU claim of es-stream, checked by one command on a machine with a CUDA GPU.

    python tools/gpu_check.py                          # all checks, ~3-6 minutes on one GPU
    python tools/gpu_check.py --only select,merge      # some of them
    python tools/gpu_check.py --device cpu --quick     # a dry run of the same code on the CPU

Prints one table row per claim (PASS, FAIL, SKIP, or DRY: ran on the CPU, where the claim itself
cannot be checked) and exits 1 when a claim fails. Without a CUDA GPU (and without
``--device cpu``) it prints "no CUDA GPU: nothing to check" and exits 0.

The checks:

* ``select``: ``ESSelector.select`` with the store on the GPU makes 0 host synchronisations per
  step (``torch.cuda.set_sync_debug_mode("error")`` turns any into an error).
* ``channel``: a memory-mapped host store behind the feedback channel against an in-memory GPU
  store, B = 4096 and 65536: ms per ``prefetch + select`` for both. Figures, not thresholds: the
  row fails when a channel step synchronises or selects other ids than the GPU store.
* ``mapped``: a memory-mapped store of ``--store-n`` (1e9: a sparse 4 GB file in ``--store-dir``,
  removed after) behind the channel, 0 synchronisations per step.
* ``merge``: a CUDA store through ``merge_rank_scores``, 2 processes over gloo
  (tests/_dist_merge.py): both ranks end with every update.
* ``composer``: the Composer algorithm (``EvolvedSampling``) on the GPU for a few steps, in a
  subprocess of the first Python that imports composer (this one, ``$ES_COMPOSER_PYTHON``, or
  ``.venv-composer`` beside this checkout); SKIP with a line saying so when there is none.
* ``pin``: ``es_stream.loader`` pins its meta-batches (``pin_memory`` when CUDA is available).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

PASS, FAIL, SKIP, DRY = "PASS", "FAIL", "SKIP", "DRY"


@dataclass
class Result:
    """One row of the table: a claim, what was measured, and its status."""

    check: str
    claim: str
    measured: str
    status: str


@dataclass
class Config:
    """What the checks run on: ``device`` (cuda, or cpu for a dry run), sizes, scratch space."""

    device: torch.device
    quick: bool
    store_n: int
    store_dir: str | None
    steps: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def verified(self, ok: bool) -> str:
        """PASS/FAIL on a GPU; on the CPU, where the claim is about the GPU, DRY when it ran."""
        if not ok:
            return FAIL
        return PASS if self.cuda else DRY


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """Any host-device synchronisation inside raises (CUDA only; a no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _batches(n: int, big_b: int, count: int, device: torch.device, seed: int = 0):
    """``count`` (ids, losses) pairs: B distinct ids on the CPU (as the loader yields them) and
    their losses on ``device`` (as the forward pass makes them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = np.unique(rng.integers(0, n, big_b + big_b // 8))
        while len(ids) < big_b:
            ids = np.unique(np.concatenate([ids, rng.integers(0, n, big_b)]))
        ids = torch.from_numpy(rng.permutation(ids)[:big_b])
        out.append((ids, torch.rand(big_b, generator=torch.Generator().manual_seed(len(out)))
                    .to(device)))
    return out


# ------------------------------------------------------------------------------------ checks
def check_select(cfg: Config) -> list[Result]:
    from es_stream import ESSelector

    n, big_b, b = (100_000 if cfg.quick else 1_000_000), 4096, 1024
    sel = ESSelector(n, b, device=cfg.device)
    batches = _batches(n, big_b, cfg.steps + 1, cfg.device)
    sel.select(*batches[0])  # warm-up: lazy CUDA initialisation may synchronise
    with no_host_sync(cfg.device):
        for ids, losses in batches[1:]:
            chosen = sel.select(ids, losses)
    ok = chosen.device.type == cfg.device.type and chosen.numel() == b
    return [Result("select", "ESSelector.select, store on the GPU: 0 host syncs per step",
                   f"{cfg.steps} steps, B={big_b}, b={b}: 0 syncs" if cfg.cuda
                   else f"{cfg.steps} steps ran (syncs are counted on CUDA only)",
                   cfg.verified(ok))]


def check_channel(cfg: Config) -> list[Result]:
    from _timing import median_ms

    from es_stream import ESSelector, ScoreStore

    n = 1_000_000 if cfg.quick else 10_000_000
    rows = []
    for big_b in ((4096,) if cfg.quick else (4096, 65536)):
        b = big_b // 4
        with tempfile.TemporaryDirectory(dir=cfg.store_dir) as directory:
            host = ScoreStore.open(os.path.join(directory, "scores.npy"), n)
            selectors = {"gpu": ESSelector(n, b, store=ScoreStore(n, device=cfg.device)),
                         "channel": ESSelector(n, b, store=host)}
            batches = _batches(n, big_b, cfg.steps + 2, cfg.device, seed=big_b)
            picks: dict[str, list[torch.Tensor]] = {}
            for name, sel in selectors.items():  # the same steps through both: same choices
                picks[name] = [sel.select(*batches[0])]  # warm-up (pinned buffers, CUDA init)
                with no_host_sync(cfg.device):
                    for ids, losses in batches[1:]:
                        sel.prefetch(ids, cfg.device)
                        picks[name].append(sel.select(ids, losses))
            same = all(torch.equal(torch.sort(a.cpu())[0], torch.sort(c.cpu())[0])
                       for a, c in zip(picks["gpu"], picks["channel"]))
            times = {}
            for name, sel in selectors.items():
                it = iter(batches * (cfg.steps + 10))

                def step(sel=sel, it=it) -> None:
                    ids, losses = next(it)
                    sel.prefetch(ids, cfg.device)
                    sel.select(ids, losses)
                times[name] = median_ms(step, cfg.steps, cfg.device)
                sel.flush()
            selectors.clear()
        rows.append(Result(
            "channel", f"feedback channel (mmap host store) vs in-memory GPU store, B={big_b}",
            f"{times['channel']:.3f} ms vs {times['gpu']:.3f} ms per step "
            f"(+{times['channel'] - times['gpu']:.3f} ms), same picks: {same}",
            cfg.verified(same)))
    return rows


def check_mapped(cfg: Config) -> list[Result]:
    from _timing import median_ms

    from es_stream import ESSelector, ScoreStore

    n, big_b, b = cfg.store_n, 4096, 1024
    with tempfile.TemporaryDirectory(dir=cfg.store_dir) as directory:
        t0 = time.perf_counter()
        store = ScoreStore.open(os.path.join(directory, "scores.npy"), n)
        created = time.perf_counter() - t0
        sel = ESSelector(n, b, store=store)
        batches = _batches(n, big_b, cfg.steps + 1, cfg.device, seed=1)
        sel.select(*batches[0])
        with no_host_sync(cfg.device):
            for ids, losses in batches[1:]:
                sel.prefetch(ids, cfg.device)
                sel.select(ids, losses)
        it = iter(batches * 4)

        def step() -> None:
            ids, losses = next(it)
            sel.prefetch(ids, cfg.device)
            sel.select(ids, losses)
        ms = median_ms(step, cfg.steps, cfg.device)
        sel.flush()
        updated = int(store.scored_range(0, min(n, 1 << 20)).sum()) + 1  # read back: it landed
        del sel, store
    return [Result("mapped", f"memory-mapped store of {n:.0e} behind the channel: 0 syncs",
                   f"created in {created * 1e3:.0f} ms, {ms:.3f} ms per step, 0 syncs"
                   if cfg.cuda else f"{ms:.3f} ms per step (CPU: read directly)",
                   cfg.verified(updated > 0))]


def check_merge(cfg: Config) -> list[Result]:
    from _dist_merge import expected_scores

    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=_pythonpath())
        procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "_dist_merge.py"),
                                   cfg.device.type, "memory", directory],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(2)]
        outputs = [p.communicate(timeout=180)[0] for p in procs]
        if any(p.returncode for p in procs):
            tail = next(o for p, o in zip(procs, outputs) if p.returncode).strip().splitlines()
            return [Result("merge", "a CUDA store through merge_rank_scores (2 ranks, gloo)",
                           f"a rank failed: {tail[-1] if tail else '?'}", FAIL)]
        stores = [np.load(os.path.join(directory, f"rank{r}.npy")) for r in range(2)]
        devices = [json.loads(Path(directory, f"rank{r}.json").read_text())["device"]
                   for r in range(2)]
    ok = all(np.array_equal(s, expected_scores()) for s in stores) and \
        all(d.startswith(cfg.device.type) for d in devices)
    return [Result("merge", "a CUDA store through merge_rank_scores (2 ranks, gloo)",
                   f"stores on {devices[0]}, both equal to every rank's updates: {ok}",
                   cfg.verified(ok))]


def check_composer(cfg: Config) -> list[Result]:
    claim = "Composer EvolvedSampling on the GPU, a few steps"
    python = composer_python()
    if python is None:
        return [Result("composer", claim, "composer is not importable here, nor in "
                       "$ES_COMPOSER_PYTHON or .venv-composer: not checked", SKIP)]
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--composer-child",
                           cfg.device.type], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=_pythonpath()))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return [Result("composer", claim, f"failed: {tail[-1] if tail else proc.returncode}",
                       FAIL)]
    got = json.loads(lines[-1])
    ok = got["steps"] == got["expected_steps"] and got["scored"] > 0
    return [Result("composer", claim, f"{got['steps']} steps on {got['device']}, "
                   f"{got['scored']} samples scored, store on {got['store']}", cfg.verified(ok))]


def check_pin(cfg: Config) -> list[Result]:
    import webdataset as wds

    from es_stream import Corpus, ESDataset, loader

    with tempfile.TemporaryDirectory() as directory:
        for s in range(2):
            with wds.TarWriter(os.path.join(directory, f"train-{s:06d}.tar")) as w:
                for i in range(32):
                    w.write({"__key__": f"s{s}-{i:04d}", "npy": np.full(16, i, np.float32),
                             "cls": i % 4})
        ds = ESDataset(Corpus.from_webdataset(directory), 16)
        mb = next(iter(loader(ds, num_workers=2)))
        pinned = mb.ids.is_pinned() and mb.data["npy"].is_pinned()
    return [Result("pin", "es_stream.loader pins meta-batches (pin_memory with CUDA)",
                   f"ids and data pinned: {pinned}", PASS if pinned else
                   (FAIL if cfg.cuda else DRY))]


CHECKS: dict[str, Callable[[Config], list[Result]]] = {
    "select": check_select, "channel": check_channel, "mapped": check_mapped,
    "merge": check_merge, "composer": check_composer, "pin": check_pin}


# ------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _given(value: int | None, default: int) -> int:
    return default if value is None else value  # (0 is given: the check it reaches refuses it)


def _pythonpath() -> str:
    return os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def composer_python() -> str | None:
    """A Python that imports composer: this one, ``$ES_COMPOSER_PYTHON``, or .venv-composer
    beside this checkout (Composer pins another torch than the main environment)."""
    candidates = [sys.executable, os.environ.get("ES_COMPOSER_PYTHON"),
                  str(REPO / ".venv-composer" / "bin" / "python")]
    for python in candidates:
        if python and os.path.exists(python) and subprocess.run(
                [python, "-c", "import composer"], capture_output=True).returncode == 0:
            return python
    return None


def composer_child(device: str) -> None:
    """Runs in the composer Python: EvolvedSampling over real MDS shards for a few steps, the
    store on ``device``; prints a JSON line."""
    import torch.nn.functional as F
    from composer import Trainer
    from composer.models import ComposerModel
    from streaming import MDSWriter

    from es_stream.integrations.composer import EvolvedSampling
    from es_stream.integrations.streaming_dataset import ESStreamingDataset

    class Model(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 4)

        def forward(self, batch):
            return self.net(batch["x"])

        def loss(self, outputs, batch, reduction: str = "mean"):
            return F.cross_entropy(outputs, batch["y"], reduction=reduction)

    n, big_b, b, steps = 128, 32, 8, 4
    with tempfile.TemporaryDirectory() as directory:
        rng = np.random.default_rng(0)
        with MDSWriter(out=directory, columns={"x": "ndarray:float32:8", "y": "int"}) as w:
            for i in range(n):
                w.write({"x": rng.normal(size=8).astype(np.float32), "y": i % 4})
        dataset = ESStreamingDataset(local=directory, batch_size=big_b, shuffle=True)
        algorithm = EvolvedSampling(batch_size=b, store_device=device)
        model = Model()
        trainer = Trainer(model=model, train_dataloader=torch.utils.data.DataLoader(
            dataset, batch_size=big_b), max_duration=f"{steps}ba",
            optimizers=torch.optim.SGD(model.parameters(), lr=0.1), algorithms=[algorithm],
            device="gpu" if device == "cuda" else "cpu", progress_bar=False,
            log_to_console=False, device_train_microbatch_size=b)
        trainer.fit()
        store = algorithm.selector.store
        print(json.dumps({"steps": int(trainer.state.timestamp.batch), "expected_steps": steps,
                          "device": str(next(model.parameters()).device),
                          "store": str(store.device),
                          "scored": int(store.scored_range(0, store.num_samples).sum())}))
        trainer.close()


def run_checks(cfg: Config, names: list[str]) -> list[Result]:
    """Each check in turn; one that raises is a FAIL row naming the error (the others still run)."""
    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            rows = CHECKS[name](cfg)
        except Exception as exc:  # a check that breaks is a failed claim, not a crashed tool
            traceback.print_exc(file=sys.stderr)
            rows = [Result(name, CHECKS[name].__name__, f"{type(exc).__name__}: {exc}"[:200],
                           FAIL)]
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
        results.extend(rows)
    return results


def table(results: list[Result]) -> str:
    """The results as a fixed-width text table."""
    width = max([len(r.claim) for r in results] + [5])
    lines = [f"{'status':<6}  {'check':<8}  {'claim':<{width}}  measured"]
    lines += [f"{r.status:<6}  {r.check:<8}  {r.claim:<{width}}  {r.measured}" for r in results]
    return "\n".join(lines)


def exit_code(results: list[Result]) -> int:
    """1 when any claim failed, else 0 (SKIP and DRY rows do not fail the run)."""
    return int(any(r.status == FAIL for r in results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="checks: " + ", ".join(CHECKS))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default); cpu: a dry run of the same code (no claim verified)")
    p.add_argument("--only", default=",".join(CHECKS),
                   help="comma-separated checks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes (for the test suite)")
    p.add_argument("--store-n", type=lambda s: int(float(s)), default=None,
                   help="size of the memory-mapped store of 'mapped' (default 1e9; 1e6 quick)")
    p.add_argument("--store-dir", default=None,
                   help="where the store files go (default: the temp dir); needs ~1 GB free")
    p.add_argument("--steps", type=int, default=None, help="steps per timing (default 30; 5 quick)")
    p.add_argument("--composer-child", metavar="DEVICE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.composer_child:
        composer_child(args.composer_child)
        return 0
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in CHECKS]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check (--device cpu runs the checks' code on the CPU)")
        return 0
    cfg = Config(device=torch.device(args.device), quick=args.quick,
                 store_n=_given(args.store_n, 1_000_000 if args.quick else 1_000_000_000),
                 store_dir=args.store_dir, steps=_given(args.steps, 5 if args.quick else 30))
    results = run_checks(cfg, names)
    print(table(results))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
