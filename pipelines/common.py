"""What the pipelines' command lines share (``pipelines.mnist1d``, ``pipelines.textlm``, and
``tools/bench_train.py``).

The selection and pruning flags (:func:`add_selection_args`), the parsing of ``--methods`` and
``--seeds``, the :class:`pipelines.loop.RunConfig` fields those flags become
(:func:`selection_kwargs`), one run per (method, seed) through the shared loop
(:func:`train_each`), the body of a pipeline's ``main`` around it (:func:`train_pipeline`) and
torch's thread count for the length of a run (:func:`torch_threads`).
The training loop itself, with the method table, is :mod:`pipelines.loop`.

Nothing here imports torch or es_stream at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .methods import ES_OPTIONS  # noqa: F401  (``RunConfig.es_options`` given on the command line)
#: pruning options (fields of ``RunConfig``)
PRUNE_OPTIONS = ("eswp_ratio", "infobatch_ratio", "prune_anneal", "prune_burn_in_epochs")

#: help of the selection and pruning flags, by option name
SELECTION_HELP = {
    "beta1": "ES weight EMA coefficient",
    "beta2": "ES score EMA coefficient",
    "burn_in": "ES: fraction of steps uniform first",
    "anneal": "ES: fraction of steps uniform last",
    "eswp_ratio": "eswp: fraction pruned per epoch",
    "infobatch_ratio": "infobatch: fraction of below-mean-loss samples pruned per epoch",
    "prune_anneal": "eswp/infobatch: fraction of final epochs left unpruned",
    "prune_burn_in_epochs": "eswp: first epochs left unpruned (scores need one pass first)",
}


def add_selection_args(group: Any, help: dict[str, str] | None = None) -> None:
    """Add ``--beta1 --beta2 --burn-in --anneal --eswp-ratio --infobatch-ratio --prune-anneal
    --prune-burn-in-epochs`` with their defaults to ``group`` (a parser or argument group);
    ``help`` replaces some of :data:`SELECTION_HELP`."""
    h = {**SELECTION_HELP, **(help or {})}
    group.add_argument("--beta1", type=float, default=0.2, help=h["beta1"])
    group.add_argument("--beta2", type=float, default=0.8, help=h["beta2"])
    group.add_argument("--burn-in", type=float, default=0.0, help=h["burn_in"])
    group.add_argument("--anneal", type=float, default=0.0, help=h["anneal"])
    group.add_argument("--eswp-ratio", type=float, default=0.3, help=h["eswp_ratio"])
    group.add_argument("--infobatch-ratio", type=float, default=0.5, help=h["infobatch_ratio"])
    group.add_argument("--prune-anneal", type=float, default=0.125, help=h["prune_anneal"])
    group.add_argument("--prune-burn-in-epochs", type=int, default=1,
                       help=h["prune_burn_in_epochs"])


def add_reference_args(group: Any) -> None:
    """Add the reference model's flags (methods ``rho``, ``rho_es``, ``band_*``; defaults per
    workload in :data:`pipelines.reference.DEFAULTS`) and ``--prune-keep`` to ``group``."""
    group.add_argument("--reference-heldout", type=int, default=None,
                       help="reference: held-out samples it trains on (MNIST-1D: generated with "
                            "--reference-seed and the same label noise; textlm: sequences of "
                            "the train shards after those trained on) [mnist1d 10000, textlm 4096]")
    group.add_argument("--reference-width", type=int, default=None,
                       help="reference: MNIST-1D CNN width (the target's 32) / textlm GRU hidden "
                            "size [mnist1d 16, textlm 64]")
    group.add_argument("--reference-epochs", type=int, default=None,
                       help="reference: training epochs [mnist1d 10, textlm 2]")
    group.add_argument("--reference-lr", type=float, default=None,
                       help="reference: Adam peak LR (cosine) [3e-3]")
    group.add_argument("--reference-seed", type=int, default=1042,
                       help="reference: MNIST-1D generation seed of its held-out split")
    group.add_argument("--prune-keep", type=float, default=0.5,
                       help="band_* and prune_random: fraction of the corpus kept, decided once")


def reference_config(args: argparse.Namespace, workload: str) -> Any:
    """The :class:`pipelines.reference.ReferenceConfig` of the flags of
    :func:`add_reference_args` for ``workload`` (b: the run's ``--b``)."""
    from .reference import ReferenceConfig

    return ReferenceConfig.for_workload(
        workload, heldout=args.reference_heldout, width=args.reference_width,
        epochs=args.reference_epochs, lr=args.reference_lr, data_seed=args.reference_seed,
        b=args.b)


def check_reference_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         workload: str) -> None:
    """Validate :func:`add_reference_args`'s flags (``parser.error`` naming the flag) and set
    ``args.reference`` to their :class:`pipelines.reference.ReferenceConfig`."""
    if not 0.0 < args.prune_keep <= 1.0:
        parser.error(f"--prune-keep must be a fraction in (0, 1], got {args.prune_keep}")
    try:
        args.reference = reference_config(args, workload)
    except ValueError as e:
        parser.error(str(e))


def ints(text: Any) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (empty items skipped)."""
    return [int(v) for v in str(text).split(",") if v.strip()]


def floats(text: Any) -> list[float]:
    """``"0,0.2"`` -> ``[0.0, 0.2]`` (empty items skipped)."""
    return [float(v) for v in str(text).split(",") if v.strip()]


def add_methods_arg(parser: Any, default: str = "uniform,es") -> None:
    """Add ``--methods`` (comma-separated; the choices are the method registry's,
    :mod:`pipelines.methods`) to ``parser``."""
    from .methods import names

    parser.add_argument("--methods", default=default,
                        help=f"comma-separated, from: {','.join(names())}")


def parse_methods(parser: argparse.ArgumentParser, text: str,
                  choices: tuple[str, ...] | None = None) -> list[str]:
    """The comma-separated methods of ``text``; ``parser.error`` if one is not in ``choices``
    (default: the method registry's names) or there are none."""
    if choices is None:
        from .methods import names

        choices = names()
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in choices]
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown}; choose from {','.join(choices)}")
    return methods


def check_batch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` unless ``1 <= args.b <= args.B``."""
    if not 1 <= args.b <= args.B:
        parser.error(f"need 1 <= b <= B, got b={args.b}, B={args.B}")


def selection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`pipelines.loop.RunConfig` fields of the flags of :func:`add_selection_args`:
    ``es_options`` and the pruning options."""
    return {"es_options": {k: getattr(args, k) for k in ES_OPTIONS},
            **{k: getattr(args, k) for k in PRUNE_OPTIONS}}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``max(1, threads)`` torch threads, then restore torch's count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_each(args: argparse.Namespace, workload: Any, out: Path,
               **run: Any) -> list[dict[str, Any]]:
    """One run of ``workload`` per (method, seed) of ``args`` through the shared loop
    (:func:`pipelines.loop.train`), methods outermost, each printed as it ends. The run's
    settings are the flags ``--epochs --b --B --lr --workers --no-progress`` and those of
    :func:`add_selection_args`, plus ``run`` (more :class:`pipelines.loop.RunConfig` fields);
    its scores and manifests go to ``out/runs/METHOD-seedS``."""
    from .loop import RunConfig, train

    q = workload.quality
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            config = RunConfig(args.epochs, b=args.b, B=args.B, lr=args.lr, seed=seed,
                               workers=args.workers, progress=not args.no_progress,
                               run_dir=str(out / "runs" / f"{method}-seed{seed}"),
                               **selection_kwargs(args), **run)
            r = train(workload, method, config)
            print(f"{method:>18} seed {seed}: {r['wall_clock_s']:.1f} s, final {q} "
                  f"{r[f'final_{q}']:.4f}, best {r[f'best_{q}']:.4f} ({r['params']} params)",
                  flush=True)
            runs.append(r)
    return runs


def train_pipeline(args: argparse.Namespace, build: Callable[[Path], Any],
                   make_workload: Callable[[Any], Any], describe: Callable[[Any, float], str],
                   reference: Callable[[Path, Any, Any], Any] | None = None,
                   **run: Any) -> tuple[Path, Any, float, list[dict[str, Any]]]:
    """What a pipeline's ``main`` does between parsing and reporting: make ``args.out``, build
    the data with ``build(OUT / "data")`` (timed; ``describe(data, seconds)`` is printed), then
    train every (method, seed) on ``make_workload(data)`` (:func:`train_each`, with ``run``), all
    with ``args.threads`` torch threads. When a method reads a reference model (``reference``
    in :mod:`pipelines.methods`), ``reference(OUT, data, workload)`` trains and scores it first
    (cached under ``OUT``) and its :class:`pipelines.loop.Reference` goes to those runs.
    Returns ``(out, data, data_s, runs)``."""
    from .methods import get

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(args.threads):
        t0 = time.perf_counter()
        data = build(out / "data")
        data_s = time.perf_counter() - t0
        print(describe(data, data_s), flush=True)
        workload = make_workload(data)
        if reference is not None and any(get(m).reference for m in args.methods):
            run["reference"] = reference(out, data, workload)
        if hasattr(args, "prune_keep"):
            run["prune_keep"] = args.prune_keep
        runs = train_each(args, workload, out, **run)
    return out, data, data_s, runs
