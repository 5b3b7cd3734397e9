"""The ``es-stream`` command line. One sub-command per task; ``--help`` on each."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .errors import ESStreamError

if TYPE_CHECKING:
    from .plot import Phases


class _UsageError(ValueError):
    """Arguments that parse but do not go together: reported as a usage error (exit 2)."""


PROGRESS_MIN_SHARDS = 32  # fewer local shards index in well under a second: no bar needed


def index_progress(urls: list[str], *, disabled: bool,
                   tty: bool) -> Callable[[list[str]], Iterable[str]] | None:
    """The progress wrapper ``es-stream index`` scans shards through, or None for no bar.

    A bar over many shards (>= ``PROGRESS_MIN_SHARDS``) or over any streamed one (``pipe:`` or
    a URL: each is read in full, so even a few can take minutes); never with
    ``--no-progress`` or when stderr is not a terminal (logs and pipes get no bar lines)."""
    from .corpus import is_local_url

    from .progress import progress

    if disabled or not tty:
        return None
    if len(urls) < PROGRESS_MIN_SHARDS and all(is_local_url(u) for u in urls):
        return None
    return lambda shards: progress(shards, desc="index", unit="shard")


def _check_output(flag: str, path: str, example: str,
                  ours: "tuple[str, Callable[[str], bool]] | None" = None) -> None:
    """The rule for a file a command writes where the user points it: a directory there is
    refused (suggesting ``path/example``); with ``ours = (what, test)``, an existing file is
    replaced only when ``test(path)`` says es-stream wrote it, and anything else is refused,
    naming ``what`` ("an index"), and left as it is."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give the file to write, e.g. "
                         f"{os.path.join(path, example)}")
    if ours is not None and os.path.lexists(path) and not ours[1](path):
        raise ValueError(f"{flag} {path} exists and is not {ours[0]} es-stream wrote; remove it "
                         "or choose another path (it is left as it is)")


def _cmd_index(args: argparse.Namespace) -> int:
    from .corpus import Corpus, expand_urls, is_index_file
    from .remote.index import holds_mds

    # an index is derived data: one es-stream wrote is replaced (atomically), nothing else
    _check_output("--output", args.output, "corpus.parquet", ours=("an index", is_index_file))
    start = time.perf_counter()
    if args.format == "mds" or (args.format == "auto" and len(args.shards) == 1
                                and holds_mds(args.shards[0])):
        corpus = Corpus.from_mds(args.shards[0], remote=args.remote)
    else:
        urls = expand_urls(args.shards[0] if len(args.shards) == 1 else args.shards)
        progress = index_progress(urls, disabled=args.no_progress, tty=sys.stderr.isatty())
        corpus = Corpus.from_webdataset(urls, allow_truncated=args.allow_truncated,
                                        progress=progress)
    corpus.save(args.output)
    print(f"indexed {corpus.num_samples} samples in {corpus.num_shards} {corpus.format} shards "
          f"in {time.perf_counter() - start:.2f}s -> {args.output} "
          f"(fingerprint {corpus.fingerprint})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .manifest import applies_to_all, list_epochs
    from .plot import (figure_format, histogram_epoch, is_es_stream_figure, plot_manifests,
                       pruning_phases, pyplot)

    if not os.path.isdir(args.manifests):
        raise FileNotFoundError(f"{args.manifests}: no such manifest directory")
    if args.plot:  # before any work: matplotlib, a format it can write, and not the user's file
        pyplot()
        figure_format(args.plot)
        _check_output("--plot", args.plot, "manifests.png", ours=("a figure", is_es_stream_figure))
    epochs = list_epochs(args.manifests)
    if not epochs:
        raise ValueError(f"{args.manifests}: no finished epoch directories (epoch=EEEEE/_SUCCESS)")
    per_shard: dict[int, list[float]] = {}
    kept_fraction: dict[int, float] = {}
    pruned: dict[int, int] = {}
    print(f"{'epoch':>5} {'samples':>10} {'kept':>10} {'kept %':>7}  "
          "per-shard kept % min/median/max")
    for e in epochs:
        keeps = [part["keep"] for part in _epoch_columns(args.manifests, e, ["keep"])]
        per_shard[e] = [float(np.mean(k)) for k in keeps]
        k = np.concatenate(keeps)
        kept_fraction[e], pruned[e] = float(k.mean()), int((~k).sum())
        shard_fracs = per_shard[e]
        print(f"{e:>5} {len(k):>10} {int(k.sum()):>10} {100 * k.mean():>6.1f}%  "
              f"{100 * min(shard_fracs):.1f} / {100 * float(np.median(shard_fracs)):.1f} / "
              f"{100 * max(shard_fracs):.1f}")
    once = applies_to_all(args.manifests)
    phases = pruning_phases(pruned, missing_keeps_all=not once,
                            burn_in_epochs=_burn_in_epochs(args.manifests, epochs[0]))
    print(_describe_phases(phases, once))
    shown = histogram_epoch(epochs, phases.pruned, args.epoch)
    parts = _epoch_columns(args.manifests, shown, ["keep", "score"])
    keep = np.concatenate([part["keep"] for part in parts])
    score = np.concatenate([part["score"] for part in parts])
    q = np.quantile(score, [0, 0.1, 0.5, 0.9, 1])
    print(f"scores (epoch {shown}): min {q[0]:.4g}  p10 {q[1]:.4g}  median {q[2]:.4g}  "
          f"p90 {q[3]:.4g}  max {q[4]:.4g}")
    if args.plot:
        excluded = plot_manifests(args.plot, epochs, kept_fraction, per_shard, phases, shown,
                                  score[keep], score[~keep], missing_keeps_all=not once)
        note = f" ({excluded} scores <= 0 left off the log axis)" if excluded else ""
        print(f"plot: {args.plot} (score histogram of epoch {shown}){note}")
    return 0


def _epoch_columns(manifests: str, epoch: int, columns: list[str]) -> list[dict]:
    """``columns`` of each shard file of an epoch, in shard order, each file checked (a
    ManifestError naming the file and column for one es-stream cannot have written)."""
    from .errors import ManifestError
    from .manifest import epoch_dir, read_columns

    directory = epoch_dir(manifests, epoch)
    names = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))
    if not names:
        raise ManifestError(f"{directory}: no shard files (shard=SSSSS.parquet)")
    return [read_columns(os.path.join(directory, name), columns) for name in names]


def _burn_in_epochs(manifests: str, first_epoch: int) -> int | None:
    """The burn-in of the run that wrote ``manifests``: from its run record, else 0 for
    InfoBatch (which has none), else None (unknown)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .manifest import epoch_dir
    from .manifest_run import read_run

    record = read_run(manifests)
    if record is not None and "burn_in_epochs" in record["settings"]:
        return int(record["settings"]["burn_in_epochs"])
    path = os.path.join(epoch_dir(manifests, first_epoch), "shard=00000.parquet")
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):  # only a label depends on it
        return None
    return 0 if meta.get(b"policy") == b"infobatch" else None


def _describe_phases(phases: "Phases", once: bool) -> str:
    """One line: which epochs pruned, and the burn-in and annealing around them."""
    if not phases.pruned:
        return "phases: no epoch pruned any sample"
    if once:
        return "phases: one decision, written as epoch 0, for every epoch (applies_to: all)"
    parts = [f"pruning in {len(phases.pruned)} epoch(s), {phases.pruned[0]}..{phases.pruned[-1]}"]
    for label, (a, b) in (("burn-in epochs {} (nothing pruned)", phases.burn_in),
                          ("epochs {} before the first decision (nothing pruned: a decision is "
                           "made at an epoch's end)", phases.undecided),
                          ("annealing epochs {} (nothing pruned)", phases.annealing)):
        if b > a:
            parts.append(label.format(f"{a}..{b - 1}"))
    return "phases: " + "; ".join(parts)


def _cmd_prune(args: argparse.Namespace) -> int:
    from .corpus import Corpus
    from .policy import ESWPPolicy, InfoBatchPolicy
    from .pruner import Pruner

    policy = _prune_policy(args)  # argument errors first, before any file is read
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; prune writes a manifest directory "
                         "(epoch=NNNNN/ inside it): give a new or existing directory")
    corpus = Corpus.load(args.corpus)
    if not os.path.isfile(args.scores):
        raise FileNotFoundError(f"{args.scores}: no score store (a .npy saved by ScoreStore.save)")
    # the corpus's fingerprint: scores saved for another corpus of the same size are refused
    store = open_scores_read_only(args.scores, corpus.num_samples, corpus.fingerprint)
    if policy is None:
        # offline: the decision applies now, so no burn-in and no annealing tail
        policy = (ESWPPolicy(ratio=args.ratio, anneal=0.0, burn_in_epochs=0, seed=args.seed)
                  if args.policy == "es" else InfoBatchPolicy(ratio=args.ratio, anneal=0.0, seed=args.seed))
    else:
        from .reference_scoring import require_complete

        require_complete(store, f"--policy {args.policy}")
        policy.check(store)  # never-scored, non-finite, or nothing kept: refused before writing
    start = time.perf_counter()
    summary = Pruner(corpus, store, policy, args.out,
                     overwrite=args.overwrite).write(args.epoch, args.epoch + 1)
    what = (f"policy {args.policy} ratio {args.ratio}" if args.policy in ("es", "infobatch") else
            f"policy band {args.band} keep {args.keep}, for every epoch" if args.policy == "band"
            else f"policy threshold [{args.low}, {args.high}], for every epoch")
    print(f"epoch {args.epoch}: kept {summary['kept']} of {summary['samples']} samples "
          f"({100 * summary['kept'] / summary['samples']:.1f}%; {summary['never_scored']} never "
          f"scored, all kept; {summary['rescaled']} with a loss weight other than 1), {what}, "
          f"in {time.perf_counter() - start:.2f}s -> {args.out}/epoch={args.epoch:05d}")
    return 0


def open_scores_read_only(path: str, num_samples: int, fingerprint: str):
    """A score store for reading only: pruning never writes scores, so a store on a read-only
    mount (or a file this user may not write) must do. Memory-mapped when the file is
    writable (bounded memory at any size); read into memory otherwise (4 bytes a sample),
    as the mapping es-stream's store makes is read-write."""
    from .store import ScoreStore

    if os.access(path, os.W_OK):
        return ScoreStore.open(path, num_samples, fingerprint=fingerprint)
    return ScoreStore.load(path, fingerprint=fingerprint)


def _prune_policy(args: argparse.Namespace):
    """The band or threshold policy the arguments ask for (None for es/infobatch), checking
    that each policy got its own arguments and no other's."""
    from .reference_policy import BandPolicy, ThresholdPolicy

    given = {name: getattr(args, name) for name in ("ratio", "band", "keep", "low", "high")
             if getattr(args, name) is not None}
    own = {"es": {"ratio"}, "infobatch": {"ratio"}, "band": {"band", "keep"},
           "threshold": {"low", "high"}}[args.policy]
    stray = sorted(set(given) - own)
    if stray:
        raise _UsageError(f"--policy {args.policy} does not take --{stray[0]}; it takes "
                         + " and ".join(f"--{o}" for o in sorted(own)))
    if args.policy in ("es", "infobatch"):
        if args.ratio is None:
            raise _UsageError(f"--policy {args.policy} needs --ratio (the fraction to prune)")
        return None
    if args.epoch != 0:
        raise _UsageError(f"--policy {args.policy} decides once for every epoch, written as epoch 0; "
                         f"drop --epoch {args.epoch}")
    if args.policy == "band":
        if args.keep is None or args.band is None:
            raise _UsageError("--policy band needs --band low|middle|high and --keep FRACTION")
        return BandPolicy(keep=args.keep, band=args.band)
    if args.low is None and args.high is None:
        raise _UsageError("--policy threshold needs --low, --high or both")
    return ThresholdPolicy(low=args.low, high=args.high)


@contextlib.contextmanager
def _torchrun_group() -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), a process group for the block (NCCL on a GPU,
    else gloo), destroyed after it; otherwise nothing."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cmd_score(args: argparse.Namespace) -> int:
    from .corpus import Corpus
    from .progress import show_progress
    from .reference_scoring import load_scorer, score_corpus

    # an existing store is checked by score_corpus (resumed, or refused when no scoring wrote it)
    _check_output("--out", args.out, "scores.npy")
    corpus = Corpus.load(args.corpus)
    try:
        scorer, spec = load_scorer(args.model)
    except (TypeError, AttributeError) as exc:  # named by load_scorer: shown plainly, exit 1
        raise ValueError(str(exc)) from exc
    with _torchrun_group():
        device = args.device or scorer.device
        result = score_corpus(corpus, scorer, args.out, meta_batch_size=args.meta_batch_size,
                              num_workers=args.workers, device=device,
                              scorer=scorer.identity(spec), checkpoint_every=args.checkpoint_every,
                              progress=show_progress(args.no_progress))
    if result.already_complete:
        print(f"{args.out}: already complete for scorer {result.scorer}; nothing to do")
    else:
        resumed = (f", resumed after {result.resumed_batches} meta-batches"
                   if result.resumed_batches else "")
        print(f"scored {result.scored} samples in {result.seconds:.2f}s "
              f"({result.scored / max(result.seconds, 1e-9):.0f} samples/s{resumed}), scorer "
              f"{result.scorer} -> {args.out}")
    return 0


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (epochs and seeds: 0; counts: 1)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its messages
    return parse


_non_negative_int, _positive_int = _int_at_least(0), _int_at_least(1)


def _float_in(ok, wanted: str):
    """argparse type: a number for which ``ok(value)`` holds, else an error saying ``wanted``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # fails every check below
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # what argparse names in its messages
    return parse


_prune_ratio = _float_in(lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
_keep_fraction = _float_in(lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
_finite_float = _float_in(math.isfinite, "a finite number")


def _cmd_compact(args: argparse.Namespace) -> int:
    from .compact import compact, kept_ids_of
    from .corpus import Corpus

    corpus = Corpus.load(args.corpus)
    kept_ids = kept_ids_of(corpus, None if args.all else args.manifest)
    from .progress import progress as bar, show_progress

    progress = bar if show_progress(args.no_progress) else None
    mapping = compact(corpus, kept_ids, args.out, args.format, progress=progress,
                      overwrite=args.overwrite, typed=not args.bytes_columns)
    print(f"wrote {len(kept_ids)} of {corpus.num_samples} samples to {args.out} "
          f"({args.format or corpus.format}); id mapping: {mapping}")
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .corpus import Corpus
    from .dedup import REASONS, DedupConfig, corpus_dedup, remove_parts, write_manifests

    config = DedupConfig(near=args.near, threshold=args.threshold, num_perm=args.num_perm,
                         bands=args.bands, shingle=args.shingle, seed=args.seed)
    if os.path.exists(args.manifests) and not os.path.isdir(args.manifests):
        raise ValueError(f"--manifests {args.manifests} is a file; dedup writes a manifest "
                         "directory (epoch=00000/ inside it): give a new or existing directory")
    corpus = Corpus.load(args.corpus)
    start = time.perf_counter()
    with _torchrun_group():
        parts = os.path.join(args.manifests, "_dedup_parts")  # what a rerun after a kill reuses
        result = corpus_dedup(corpus, config, filter_dir=args.filter, field=args.field,
                              num_workers=args.workers, parts_dir=parts)
        seconds = time.perf_counter() - start
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:  # every rank holds the same decision: one writes it
            out = write_manifests(corpus, result, args.manifests, config, filter_dir=args.filter)
            remove_parts(corpus, parts, args.field, config)
        if dist.is_initialized():
            dist.barrier()  # the manifests are complete when any rank returns
    if not rank0:
        return 0
    counts = ", ".join(f"{name} {result.counts[name]}" for name in REASONS)
    print(f"dedup: kept {result.counts['kept']} of {corpus.num_samples} samples ({counts}) in "
          f"{seconds:.2f}s ({corpus.num_samples / max(seconds, 1e-9):.0f} samples/s), for every "
          f"epoch -> {out}")
    return 0


_DESCRIPTION = ("Evolved Sampling over sharded corpora, offline: index shards, score them with a "
                "reference model, prune from saved scores, drop duplicates, inspect and compact "
                "the manifests.")
_DEBUG_HELP = "on an error, show the full traceback instead of one line"
_EPILOG = """exit status: 0 success; 1 an error of the inputs or the run (one line on stderr
naming the file or argument, the traceback with --debug); 2 a command line argparse
refuses (usage). A bare `es-stream` prints this help and exits 0, as pip does."""


def build_parser() -> argparse.ArgumentParser:
    """The ``es-stream`` parser: one sub-command per task, ``--version``, and ``--debug``
    accepted before or after the sub-command."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="es-stream", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"es-stream {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # SUPPRESS: a sub-command's --debug, when not given, must not reset the top-level one
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands (es-stream COMMAND --help for each)")
    index = sub.add_parser("index", parents=[common],
                           help="index WebDataset or MDS shards into a Parquet file",
                           description="Scan shard headers and write the corpus index (one row "
                           "per sample, with stable ids and byte offsets) as Parquet.")
    index.add_argument("shards", nargs="+", help="brace pattern, directory of .tar files, list of "
                       "paths/URLs (pipe:...), or an MDS directory holding index.json")
    index.add_argument("-o", "--output", required=True,
                       help="Parquet file to write; an existing one is replaced only when it is "
                       "an index es-stream wrote (anything else there is refused, not overwritten)")
    index.add_argument("--format", choices=["auto", "wds", "mds"], default="auto",
                       help="shard format (auto: MDS when the directory has index.json)")
    index.add_argument("--remote", default=None, help="MDS remote to fetch index.json/shards from")
    index.add_argument("--allow-truncated", action="store_true",
                       help="index a tar shard that lacks its end-of-archive marker (cut short) "
                       "instead of refusing it: its last sample, which may be incomplete, is "
                       "dropped, with a warning, and the count is kept in the index")
    index.add_argument("--no-progress", action="store_true",
                       help=f"no progress bar (shown on a terminal over {PROGRESS_MIN_SHARDS} or "
                       "more shards, or any pipe:/remote shard)")
    index.set_defaults(func=_cmd_index)

    inspect = sub.add_parser("inspect", parents=[common], help="summarise pruning manifests",
                             description="Kept fraction per epoch and per shard of a manifest "
                             "directory, which epochs pruned (burn-in before, annealing after: "
                             "epochs that pruned nothing), and one epoch's score distribution.")
    inspect.add_argument("manifests", help="manifest directory (holding epoch=EEEEE/)")
    inspect.add_argument("--plot", default=None, metavar="PNG",
                         help="also write a figure (PNG; .pdf, .svg, .ps, .eps, .jpg by the "
                         "extension): kept fraction per epoch (burn-in and annealing shaded), per "
                         "epoch and shard, and one epoch's scores on a log axis (needs "
                         "matplotlib); an existing file is replaced only when es-stream wrote it")
    inspect.add_argument("--epoch", type=_non_negative_int, default=None,
                         help="epoch whose scores to summarise and plot (default: the last epoch "
                         "that pruned any sample, else the last epoch)")
    inspect.set_defaults(func=_cmd_inspect)

    prune = sub.add_parser("prune", parents=[common],
                           help="write manifests from saved scores, offline",
                           description="Decide which samples to keep from a saved score store "
                           "and write one epoch's shard manifests.")
    prune.add_argument("--scores", required=True, help="score store (.npy from ScoreStore.save)")
    prune.add_argument("--corpus", required=True, help="corpus index (Parquet)")
    prune.add_argument("--policy", choices=["es", "infobatch", "band", "threshold"], default="es",
                       help="es / infobatch: one epoch's decision from training scores (--ratio); "
                       "band / threshold: from reference scores (`es-stream score`), decided once "
                       "for every epoch (written as epoch 0, marked applies_to=all)")
    prune.add_argument("--ratio", type=_prune_ratio, default=None,
                       help="es, infobatch: fraction to prune, in [0, 1)")
    prune.add_argument("--band", choices=["low", "middle", "high"], default=None,
                       help="band: which part of the score distribution to keep")
    prune.add_argument("--keep", type=_keep_fraction, default=None,
                       help="band: fraction of the corpus to keep, in (0, 1]")
    prune.add_argument("--low", type=_finite_float, default=None,
                       help="threshold: keep scores >= LOW")
    prune.add_argument("--high", type=_finite_float, default=None,
                       help="threshold: keep scores <= HIGH")
    prune.add_argument("--out", required=True, help="manifest directory")
    prune.add_argument("--epoch", type=_non_negative_int, default=0,
                       help="epoch the manifests are for (>= 0)")
    prune.add_argument("--seed", type=_non_negative_int, default=0, help="policy seed (>= 0)")
    prune.add_argument("--overwrite", action="store_true",
                       help="let this decision replace the manifests another run (another policy, "
                       "ratio, seed or corpus) wrote in --out: their epoch directories are "
                       "deleted (manifests only); without it such a directory is refused, naming "
                       "what differs")
    prune.set_defaults(func=_cmd_prune)

    score = sub.add_parser(
        "score", parents=[common], help="score every sample once with a reference model",
        description="Run a reference model over the whole corpus (every sample exactly once, "
        "DataLoader workers; under torchrun each rank its part) and write its per-sample loss "
        "to a memory-mapped score store that records the corpus and the scorer. A killed run, "
        "started again with the same arguments, resumes from its last progress point.")
    score.add_argument("--corpus", required=True, help="corpus index (Parquet)")
    score.add_argument("--model", required=True, help="pkg.module:factory — a function of no "
                       "arguments returning an es_stream.Scorer (score_fn(batch) -> Tensor[B], "
                       "optional model, decode, collate, device, name)")
    score.add_argument("--out", required=True, help="score store to write (.npy; its metadata "
                       "and progress files go beside it)")
    score.add_argument("--meta-batch-size", type=_positive_int, default=256,
                       help="samples per forward (default 256)")
    score.add_argument("--workers", type=_non_negative_int, default=2,
                       help="DataLoader workers (default 2; a resume needs the same number)")
    score.add_argument("--device", default=None, help="device for the batches (default: the "
                       "scorer's, else the host)")
    score.add_argument("--checkpoint-every", type=_positive_int, default=100,
                       help="meta-batches between progress points (default 100)")
    score.add_argument("--no-progress", action="store_true",
                       help="no progress bar (shown only when stderr is a terminal)")
    score.set_defaults(func=_cmd_score)

    dd = sub.add_parser(
        "dedup", parents=[common], help="drop exact (and near) duplicates, once for every epoch",
        description="Read every sample once, keep the first of each group of byte-identical "
        "samples (BLAKE2b-128 of the payload) and, with --near, of each group of near duplicates "
        "(MinHash + LSH over byte shingles, estimated Jaccard >= --threshold), and write the "
        "decision as epoch 0 for every epoch (applies_to=all) with a reason column per sample. "
        "With --filter, combined with a `prune --policy band|threshold` decision: only samples "
        "it keeps are kept. Under torchrun each rank reads and hashes its part and rank 0 writes. "
        "Resumable: a rerun after a kill reads only the shards not saved in "
        "MANIFESTS/_dedup_parts and writes the same files.")
    dd.add_argument("--corpus", required=True, help="corpus index (Parquet)")
    dd.add_argument("--manifests", required=True, help="manifest directory to write")
    dd.add_argument("--near", action="store_true", help="also drop near duplicates")
    dd.add_argument("--threshold", type=_float_in(lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]"),
                    default=0.8, help="near: estimated Jaccard similarity at or above which two "
                    "samples are near duplicates (default 0.8)")
    dd.add_argument("--shingle", type=_positive_int, default=5, help="near: bytes per shingle")
    dd.add_argument("--num-perm", type=_positive_int, default=128,
                    help="near: MinHash values per sample (4 bytes each)")
    dd.add_argument("--bands", type=_positive_int, default=32,
                    help="near: LSH bands (must divide --num-perm)")
    dd.add_argument("--seed", type=_non_negative_int, default=0, help="near: MinHash seed")
    dd.add_argument("--field", default=None, help="the sample field to compare (default: every "
                    "payload field)")
    dd.add_argument("--filter", default=None, metavar="DIR",
                    help="a manifest directory holding a once-for-all decision (band/threshold) "
                    "to combine with")
    dd.add_argument("--workers", type=_non_negative_int, default=2, help="DataLoader workers")
    dd.set_defaults(func=_cmd_dedup)

    comp = sub.add_parser("compact", parents=[common],
                          help="rewrite a corpus with only the kept samples",
                          description="Copy the samples a manifest keeps into new shards "
                          "(payloads byte-identical) and write mapping.parquet (old_id, new_id). "
                          "The output is written into a hidden sibling of --out and renamed into "
                          "place only when complete: --out is never left half-written, and "
                          "nothing compaction did not write is deleted.")
    comp.add_argument("--corpus", required=True, help="corpus index (Parquet)")
    which = comp.add_mutually_exclusive_group(required=True)
    which.add_argument("--manifest", help="an epoch directory: DIR/epoch=EEEEE (its kept samples)")
    which.add_argument("--all", action="store_true",
                       help="every sample of the corpus (no manifest): e.g. a WebDataset corpus "
                       "converted to MDS with --format mds for ESStreamingDataset / Composer")
    comp.add_argument("--out", required=True,
                      help="new or empty directory for the new shards; refused when it holds "
                      "other files, or is, contains or lies inside the source shards' directory "
                      "(symlinks resolved)")
    comp.add_argument("--overwrite", action="store_true",
                      help="replace --out when it holds an earlier `es-stream compact` output "
                      "(and nothing else), atomically: the new output is renamed in, then the "
                      "old one deleted; a directory holding any other file is still refused")
    comp.add_argument("--format", choices=["wds", "mds"], default=None,
                      help="output format (default: the corpus's own). Tar to MDS types each "
                      "file suffix's column as webdataset decodes it: .cls/.index/.id int, "
                      ".txt str, .json json, .npy ndarray, others bytes")
    comp.add_argument("--bytes-columns", action="store_true",
                      help="tar to MDS: every file suffix a bytes column, byte-identical (no "
                      "typed int/str/json/ndarray columns)")
    comp.add_argument("--no-progress", action="store_true",
                      help="no progress bar (shown only when stderr is a terminal)")
    comp.set_defaults(func=_cmd_compact)
    for command in sub.choices.values():
        command.set_defaults(parser=command)  # main() reports argument conflicts through it
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``es-stream --help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except _UsageError as exc:
        args.parser.error(str(exc))  # usage line + message, exit 2 (argparse's convention)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"es-stream {args.command}: interrupted", file=sys.stderr)
        return 130
    # our errors name the file or argument: show them plainly, one line, no traceback
    except (ESStreamError, OSError, ValueError, ImportError) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, always
        print(f"es-stream {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 2  # (unreachable: parser.error exits)


if __name__ == "__main__":
    sys.exit(main())
