"""The method registry: every training method of the shared loop (:mod:`pipelines.loop`)
declared once, as a :class:`Method`, and read by the loop, the benchmark's planner
(``tools/benchtrain``) and the pipelines' command lines. Adding a method is one
:func:`register` call here (and its selector or policy class in ``es_stream``).

**How the loop runs a method.** Every method reads the same stream (``ESDataset`` +
``es_stream.loader``), so loader overhead is the same for all. A method with ``batch_of_b``
reads meta-batches of b and trains on all of each; the others read meta-batches of B, score them
with a no-grad forward (per-sample losses), let their selector pick b and take a forward +
backward + step on those b. ``prune="epoch"`` methods prune the set at epoch ends through
Parquet manifests; ``prune="once"`` methods decide once, before the first step, into
``epoch=00000`` marked ``applies_to: all``, so ESDataset reads only the kept samples in every
epoch. ``reference`` methods read a reference model's per-sample losses
(:class:`pipelines.loop.Reference`, ``docs/REFERENCE.md``), whose training and scoring seconds
are added to the method's time.

**The methods.** ``uniform`` (the reference of every comparison); ``es`` (Evolved Sampling),
``loss``, ``selective_backprop``, ``topk`` and ``random`` (the control for the selection itself:
it pays for the scoring forward, then picks b uniformly); ``eswp`` (ES + :class:`ESWPPolicy` on
the selector's scores) and ``infobatch`` (each sample's last loss as its score,
:class:`InfoBatchPolicy`, kept low-loss samples weighted by ``MetaBatch.weights``).

The variants (``group="variant"``; ES selectors all): ``eswp_rescale``: ES +
``ESWPPolicy(rescale=True)`` (prunes only below-mean scores, weights the kept ones by their
inverse keep probability, taken at the selected rows); ``infobatch_es``: InfoBatch's batches of b
and policy on the ES EMA scores, recorded from the training losses (no scoring forward, so it
keeps InfoBatch's cost: an extra B-forward costs ~0.25 of a training sample); ``es_reweight``:
ES with ``reweight="unbiased"`` importance weights; ``es_to_uniform`` / ``es_from_uniform``: b
per step from a :class:`BatchSchedule` (at ``b == B`` the scoring forward is skipped and the
scores come from the training losses); ``es_fresh``: the scoring forward only on stale samples.
The variants score a tail meta-batch of at most b (trained whole) from its training losses;
``es``/``eswp`` leave its scores as they were.

The reference methods (``group="reference"``): ``rho`` back-propagates the b largest reducible
losses ``loss - reference`` (:class:`ReducibleLossSelector`, rule ``"topk"``, RHO-LOSS as
published); ``rho_es`` the ES rule on the reducible loss. ``band_low`` / ``band_middle`` /
``band_high`` train uniform batches of b on the corpus pruned once by
``BandPolicy(keep=prune_keep)`` on the reference scores; ``prune_random`` is their control (the
same path over random scores: exactly as many samples kept at random, no reference paid);
``rs2`` (RS2, Okanovic et al. 2024) keeps a fresh random ``prune_keep`` share each epoch, the
first included, without replacement across epochs until the corpus is exhausted
(:class:`~es_stream.random_subsets.RS2Policy`; the per-epoch counterpart of ``prune_random``);
``prune_chance`` prunes once with ``ThresholdPolicy(high=workload.chance_loss)``, dropping the
samples the reference model predicts worse than a uniform guess.

The web stream's curation methods (``group="reference"``, prune-once): ``oracle`` keeps exactly
the samples the workload's side table labels clean (an upper bound: it reads the labels, which
no other method does); ``dedup_exact`` / ``dedup_near`` drop exact (content hash) / exact and
near (MinHash + LSH) duplicates, reading the corpus once on the method's clock
(:class:`pipelines.curation.DedupPruner`, ``es_stream.dedup``); ``ref_filter`` keeps the samples
whose reference loss is at most the ``filter_quantile`` of the reference's losses on clean
validation text (``ThresholdPolicy``); ``dedup_filter`` is both, dedup keeping only what the
filter keeps.

**Benchmark controls.** A method with ``control`` set gets a budget-matched control in the
benchmark, ``budget_<name>``: uniform training cut to that method's time (:func:`controls`).
``uniform_B`` (uniform batches of B) is the benchmark's other control.

Nothing here imports torch or es_stream at import time: the factories import them when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

#: the ES options of the command lines and ``RunConfig.es_options`` (keys of benchmark runs)
ES_OPTIONS = ("beta1", "beta2", "burn_in", "anneal")
#: the ES options that matter only to a method that selects with them (not to scores alone)
ES_SELECT_OPTIONS = ("burn_in", "anneal")
#: the benchmark's run of the loop's ``uniform`` on batches of B
UNIFORM_B = "uniform_B"
#: the budget-matched controls' prefix: ``budget_<method>``
BUDGET_PREFIX = "budget_"


@dataclass(frozen=True)
class Context:
    """What a method's factories build from: the corpus, b, the seed, the run's steps
    (``total_steps``; ``steps_per_epoch`` of an unpruned epoch), the run's
    :class:`pipelines.loop.RunConfig` (``config``, for the method's own options), the ES options
    (``es_options``: ``RunConfig.es_options`` plus the device, for methods that take them), the
    reference :class:`~es_stream.ScoreStore` (``reference``, for methods that read one), the
    workload's ``chance_loss``, the run's ``manifests`` directory and the
    :class:`pipelines.loop.Workload` itself (``workload``: what a method needs of the data
    beyond the corpus, e.g. labels only an oracle may read)."""

    corpus: Any
    b: int
    seed: int
    total_steps: int
    steps_per_epoch: int
    config: Any
    es_options: dict[str, Any]
    reference: Any = None
    chance_loss: float | None = None
    manifests: str = ""
    workload: Any = None


SelectorFactory = Callable[[Context], Any]
PrunerFactory = Callable[[Context, Any], Any]


@dataclass(frozen=True)
class Method:
    """One training method of the loop, declared once.

    ``selector(ctx)`` builds its :class:`~es_stream.Selector` (None: the method has none);
    ``pruner(ctx, selector)`` its :class:`~es_stream.Pruner` (None: it never prunes), run at
    epoch ends (``prune="epoch"``) or once before the first step (``prune="once"``).
    ``batch_of_b``: it reads meta-batches of b and trains on all of each (no scoring forward);
    otherwise it reads B and its selector picks b. ``reference``: it reads a reference model's
    losses (``ctx.reference``; their cost is added to its time). ``es_options``: its selector
    takes the ES options. ``weighted``: it trains on the pruning policy's ``MetaBatch.weights``.
    ``train_loss_scores``: where the training losses of a step without a scoring forward go as
    scores (``"selector"``: ``selector.record``; ``"pruner"``: the pruner's store; None:
    nowhere). ``schedule``: a :class:`~es_stream.BatchSchedule` kind moving b over the run.
    ``options``: the :class:`pipelines.loop.RunConfig` fields it reads besides the ES options,
    b, B and the reference (they key its benchmark runs). ``group``: ``main``, ``variant`` or
    ``reference`` (the benchmark's grids and tables). ``control``: its name in the label of its
    budget-matched control ``budget_<name>`` (None: no control). ``label``: its name in tables;
    ``cost``: its run's cost relative to uniform's, for the benchmark's estimate only.
    ``oracle``: it reads the workload's side table of kinds (``Workload.sample_kinds``), which
    only a workload that labels its samples has: an upper bound, not a method to ship.
    ``prune_first``: a ``prune="epoch"`` pruner that also decides epoch 0, before the first step
    (a policy that reads no score, such as RS2's).
    """

    name: str
    selector: SelectorFactory | None = None
    pruner: PrunerFactory | None = None
    prune: str | None = None
    batch_of_b: bool = False
    reference: bool = False
    es_options: bool = False
    weighted: bool = False
    train_loss_scores: str | None = None
    schedule: str | None = None
    options: tuple[str, ...] = ()
    group: str = "main"
    control: str | None = None
    label: str | None = None
    cost: float = 1.0
    oracle: bool = False
    prune_first: bool = False

    def __post_init__(self) -> None:
        if self.prune_first and self.prune != "epoch":
            raise ValueError(f"method {self.name!r}: prune_first is for prune='epoch' methods "
                             "(a prune-once decision is already made before the first step)")
        if self.prune not in (None, "epoch", "once"):
            raise ValueError(f"method {self.name!r}: prune must be None, 'epoch' or 'once', "
                             f"got {self.prune!r}")
        if (self.prune is None) != (self.pruner is None):
            raise ValueError(f"method {self.name!r}: give prune and pruner together")
        if self.train_loss_scores not in (None, "selector", "pruner"):
            raise ValueError(f"method {self.name!r}: train_loss_scores must be None, "
                             f"'selector' or 'pruner', got {self.train_loss_scores!r}")
        if not self.batch_of_b and self.selector is None:
            raise ValueError(f"method {self.name!r} reads meta-batches of B: it needs a selector "
                             "(or batch_of_b=True)")

    @property
    def selects(self) -> bool:
        """Whether it forwards meta-batches of B and back-propagates the b its selector picks."""
        return not self.batch_of_b

    def run_options(self) -> frozenset[str]:
        """Every run setting that changes what this method does (the benchmark keys its runs
        by these and by the settings no method owns)."""
        out = set(self.options)
        if self.es_options:
            out.update(o for o in ES_OPTIONS if self.selects or o not in ES_SELECT_OPTIONS)
        if self.selects:
            out.add("B")
        if self.reference:
            out.add("ref_model")
        return frozenset(out)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (ValueError if its name is taken) and return it."""
    if method.name in _REGISTRY or method.name == UNIFORM_B or method.name.startswith(
            BUDGET_PREFIX):
        raise ValueError(f"method name {method.name!r} is taken (or reserved for the "
                         "benchmark's controls); choose another")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added by :func:`register` (tests' throwaway methods)."""
    del _REGISTRY[name]


def get(name: str) -> Method:
    """The method called ``name``; ValueError naming the choices if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}") from None


def names(**where: Any) -> tuple[str, ...]:
    """The registered methods' names, in registration order; ``where`` keeps those whose
    attributes equal the given values (``names(reference=False)``, ``names(group="variant")``)."""
    return tuple(m.name for m in methods()
                 if all(getattr(m, k) == v for k, v in where.items()))


def methods() -> Iterator[Method]:
    """The registered methods, in registration order."""
    return iter(list(_REGISTRY.values()))


def controls() -> dict[str, str]:
    """The benchmark's budget-matched controls: ``{"budget_<m>": "<m>"}`` for each method with
    a ``control``."""
    return {BUDGET_PREFIX + m.name: m.name for m in methods() if m.control}


def benchmark_names() -> tuple[str, ...]:
    """Every method the benchmark runs: the registry's, ``uniform_B`` and the controls."""
    out: list[str] = []
    for name in names():
        out += [name, UNIFORM_B] if name == "uniform" else [name]
    return tuple(out) + tuple(controls())


def labels() -> dict[str, str]:
    """Table labels of the benchmark's methods (those not listed are shown by name)."""
    out = {m.name: m.label for m in methods() if m.label}
    out[UNIFORM_B] = "uniform (B)"
    for control, of in controls().items():
        out[control] = f"uniform, {get(of).control}'s budget"
    return out


# ----------------------------------------------------------------------------- factories
def es_selector(**fixed: Any) -> SelectorFactory:
    """An :class:`~es_stream.ESSelector` over the corpus with the run's ES options (``fixed``
    options are defaults the run's override)."""
    def make(ctx: Context) -> Any:
        from es_stream import ESSelector

        return ESSelector(ctx.corpus.num_samples, ctx.b, seed=ctx.seed,
                          total_steps=ctx.total_steps, **{**fixed, **ctx.es_options})
    return make


def fresh_es_selector(ctx: Context) -> Any:
    """``es_fresh``'s: a score updated within ``fresh_epochs`` epochs' steps is fresh (about
    one epoch: see ESSelector's "Fresh scores")."""
    steps = max(1, round(ctx.config.fresh_epochs * ctx.steps_per_epoch))
    return es_selector(fresh_steps=steps)(ctx)


def simple_selector(cls_name: str) -> SelectorFactory:
    """A selector of ``es_stream`` that takes b and the seed only."""
    def make(ctx: Context) -> Any:
        import es_stream

        return getattr(es_stream, cls_name)(ctx.b, seed=ctx.seed)
    return make


def reducible_selector(rule: str) -> SelectorFactory:
    """A :class:`~es_stream.ReducibleLossSelector` on the reference store with ``rule``
    (``"es"`` takes the ES options)."""
    def make(ctx: Context) -> Any:
        from es_stream import ReducibleLossSelector

        require_reference(ctx, rule)
        extra = ({"total_steps": ctx.total_steps, **ctx.es_options} if rule == "es" else {})
        return ReducibleLossSelector(ctx.reference, ctx.b, rule,
                                     fingerprint=ctx.corpus.fingerprint, seed=ctx.seed, **extra)
    return make


def require_reference(ctx: Context, what: str) -> None:
    if ctx.reference is None:
        raise ValueError(f"{what} needs the reference store (RunConfig.reference)")


def eswp_pruner(rescale: bool) -> PrunerFactory:
    """ESWP on the ES selector's store (``rescale``: ``ESWPPolicy(rescale=True,
    min_keep=rescale_min_keep)``)."""
    def make(ctx: Context, selector: Any) -> Any:
        from es_stream import ESWPPolicy, Pruner

        c = ctx.config
        extra = {"rescale": True, "min_keep": c.rescale_min_keep} if rescale else {}
        return Pruner(ctx.corpus, selector.store, ESWPPolicy(
            c.eswp_ratio, anneal=c.prune_anneal, burn_in_epochs=c.prune_burn_in_epochs,
            seed=ctx.seed, **extra), ctx.manifests)
    return make


def infobatch_pruner(on_selector: bool) -> PrunerFactory:
    """InfoBatch on a store of its own (the last losses) or on the ES selector's store."""
    def make(ctx: Context, selector: Any) -> Any:
        from es_stream import InfoBatchPolicy, Pruner, ScoreStore

        store = selector.store if on_selector else ScoreStore(ctx.corpus.num_samples)
        c = ctx.config
        return Pruner(ctx.corpus, store, InfoBatchPolicy(c.infobatch_ratio,
                                                         anneal=c.prune_anneal, seed=ctx.seed),
                      ctx.manifests)
    return make


def band_pruner(band: str) -> PrunerFactory:
    """Keep ``ceil(prune_keep * n)`` samples of ``band`` of the reference store, once."""
    def make(ctx: Context, selector: Any) -> Any:
        from es_stream import BandPolicy, Pruner

        require_reference(ctx, f"method 'band_{band}'")
        return Pruner(ctx.corpus, ctx.reference, BandPolicy(ctx.config.prune_keep, band),
                      ctx.manifests)
    return make


def random_pruner(ctx: Context, selector: Any) -> Any:
    """As many samples as a band keeps, chosen at random (seeded): the same BandPolicy over a
    store of random scores, so it goes through exactly the bands' path."""
    from es_stream import BandPolicy, Pruner

    return Pruner(ctx.corpus, random_scores(ctx.corpus, ctx.seed),
                  BandPolicy(ctx.config.prune_keep, "low"), ctx.manifests)


def rs2_pruner(ctx: Context, selector: Any) -> Any:
    """RS2 (Okanovic et al. 2024): a fresh random ``prune_keep`` share of the corpus per epoch,
    without replacement across epochs (:class:`~es_stream.random_subsets.RS2Policy`); it reads
    no score, so its store stays empty."""
    from es_stream import Pruner, ScoreStore
    from es_stream.random_subsets import RS2Policy

    store = ScoreStore(ctx.corpus.num_samples, fingerprint=ctx.corpus.fingerprint)
    return Pruner(ctx.corpus, store, RS2Policy(ctx.config.prune_keep, seed=ctx.seed),
                  ctx.manifests)


def chance_pruner(ctx: Context, selector: Any) -> Any:
    """Drop the samples whose reference loss is above the workload's chance level."""
    from es_stream import Pruner, ThresholdPolicy

    if ctx.reference is None or ctx.chance_loss is None:
        raise ValueError("method 'prune_chance' needs the reference store (RunConfig."
                         "reference) and the workload's chance_loss")
    return Pruner(ctx.corpus, ctx.reference, ThresholdPolicy(high=ctx.chance_loss), ctx.manifests)


def oracle_pruner(ctx: Context, selector: Any) -> Any:
    """Keep exactly the samples the workload's side table labels clean (``kind_names[0]``),
    through the same prune-once path (a store of 0 for clean, 1 for the rest, kept up to 0.5)."""
    import torch
    from es_stream import Pruner, ScoreStore, ThresholdPolicy

    w = ctx.workload
    if w is None or w.sample_kinds is None:
        raise ValueError("method 'oracle' reads the workload's side table of kinds "
                         "(Workload.sample_kinds): this workload has none")
    store = ScoreStore(ctx.corpus.num_samples, fingerprint=ctx.corpus.fingerprint)
    store.scatter(torch.arange(ctx.corpus.num_samples), (w.sample_kinds != 0).float())
    return Pruner(ctx.corpus, store, ThresholdPolicy(high=0.5), ctx.manifests)


def filter_threshold(ctx: Context) -> float:
    """The reference filter's bound: the ``filter_quantile`` of the reference's losses on its
    clean validation text (a sample the reference predicts worse than that does not look like
    the curated text it was trained on)."""
    import numpy as np

    ref = ctx.config.reference
    if ctx.reference is None or ref is None or not ref.clean_losses:
        raise ValueError("the reference filter needs the reference store and the reference's "
                         "losses on clean validation text (Reference.clean_losses)")
    return float(np.quantile(np.asarray(ref.clean_losses), ctx.config.filter_quantile))


def filter_pruner(ctx: Context, selector: Any, out_dir: str | None = None) -> Any:
    """Keep the samples whose reference loss is at most :func:`filter_threshold`, once."""
    from es_stream import Pruner, ThresholdPolicy

    return Pruner(ctx.corpus, ctx.reference, ThresholdPolicy(high=filter_threshold(ctx)),
                  out_dir or ctx.manifests)


def dedup_pruner(near: bool, filtered: bool = False) -> PrunerFactory:
    """Exact (and with ``near`` near-duplicate) deduplication, once, read from the corpus on the
    method's clock (:class:`pipelines.curation.DedupPruner`); ``filtered``: ANDed with the
    reference filter (:func:`filter_pruner`), dedup keeping only what the filter keeps."""
    def make(ctx: Context, selector: Any) -> Any:
        from es_stream.dedup import DedupConfig

        from .curation import DedupPruner, filter_dir

        flt = filter_pruner(ctx, selector, filter_dir(ctx.manifests)) if filtered else None
        return DedupPruner(ctx.corpus, ctx.manifests, DedupConfig(near=near), flt)
    return make


def random_scores(corpus: Any, seed: int) -> Any:
    """An in-memory :class:`~es_stream.ScoreStore` of uniform random scores in [0, 1), one per
    sample of ``corpus``, drawn from ``seed`` (a band of it is a random subset of exactly the
    band's size)."""
    import torch
    from es_stream import ScoreStore

    n = corpus.num_samples
    store = ScoreStore(n, fingerprint=corpus.fingerprint)
    g = torch.Generator().manual_seed(seed)
    store.scatter(torch.arange(n), torch.rand(n, generator=g))
    return store


# ----------------------------------------------------------------------------- the registry
_ESWP = ("eswp_ratio", "prune_burn_in_epochs", "prune_anneal")
_INFOBATCH = ("infobatch_ratio", "prune_anneal")

register(Method("uniform", batch_of_b=True, label="uniform (b)"))
register(Method("es", es_selector(), es_options=True, control="ES", cost=0.9))
register(Method("eswp", es_selector(), eswp_pruner(False), "epoch", es_options=True,
                options=_ESWP, control="ESWP", cost=0.75))
register(Method("infobatch", pruner=infobatch_pruner(False), prune="epoch", batch_of_b=True,
                weighted=True, train_loss_scores="pruner", options=_INFOBATCH,
                control="InfoBatch", cost=0.85))
register(Method("loss", simple_selector("LossSelector"), cost=0.9))
register(Method("selective_backprop", simple_selector("SelectiveBackpropSelector"),
                label="selective backprop", cost=0.9))
register(Method("topk", simple_selector("TopKSelector"), cost=0.9))
register(Method("random", simple_selector("UniformSelector"), label="random (b of B)", cost=0.9))
register(Method("eswp_rescale", es_selector(), eswp_pruner(True), "epoch", es_options=True,
                weighted=True, train_loss_scores="selector",
                options=_ESWP + ("rescale_min_keep",), group="variant", control="rescaled ESWP",
                cost=0.75))
register(Method("infobatch_es", es_selector(), infobatch_pruner(True), "epoch",
                batch_of_b=True, es_options=True, weighted=True, train_loss_scores="selector",
                options=_INFOBATCH, group="variant", control="InfoBatch-on-ES", cost=0.85))
register(Method("es_reweight", es_selector(reweight="unbiased"), es_options=True,
                train_loss_scores="selector", group="variant", cost=0.9))
register(Method("es_to_uniform", es_selector(), es_options=True, train_loss_scores="selector",
                schedule="to_uniform", options=("b_ramp",), group="variant", cost=0.9))
register(Method("es_from_uniform", es_selector(), es_options=True,
                train_loss_scores="selector", schedule="from_uniform", options=("b_ramp",),
                group="variant", cost=0.9))
register(Method("es_fresh", fresh_es_selector, es_options=True, train_loss_scores="selector",
                options=("fresh_epochs",), group="variant", cost=0.8))
register(Method("prune_random", pruner=random_pruner, prune="once", batch_of_b=True,
                options=("prune_keep",), group="reference", label="random pruning (once)",
                cost=0.5))
register(Method("rs2", pruner=rs2_pruner, prune="epoch", batch_of_b=True, prune_first=True,
                options=("prune_keep",), group="reference", control="RS2",
                label="RS2 (fresh random subset per epoch)", cost=0.5))
register(Method("rho", reducible_selector("topk"), reference=True, group="reference",
                control="RHO-LOSS", label="RHO-LOSS (top b of B)", cost=0.9))
register(Method("rho_es", reducible_selector("es"), reference=True, es_options=True,
                group="reference", control="ES-on-reducible-loss",
                label="ES rule on reducible loss", cost=0.9))
for _band in ("low", "middle", "high"):
    register(Method(f"band_{_band}", pruner=band_pruner(_band), prune="once", batch_of_b=True,
                    reference=True, options=("prune_keep",), group="reference",
                    label=f"band {_band} (pruned once)", cost=0.5))
register(Method("prune_chance", pruner=chance_pruner, prune="once", batch_of_b=True,
                reference=True, group="reference", control="chance-pruning",
                label="reference loss < chance (pruned once)", cost=0.65))
register(Method("oracle", pruner=oracle_pruner, prune="once", batch_of_b=True,
                oracle=True, group="reference", label="oracle filter (labels; an upper bound)", cost=1.0))
register(Method("dedup_exact", pruner=dedup_pruner(False), prune="once", batch_of_b=True,
                group="reference", label="dedup, exact (once)", cost=1.0))
register(Method("dedup_near", pruner=dedup_pruner(True), prune="once", batch_of_b=True,
                group="reference", control="near-dedup", label="dedup, exact + near (once)",
                cost=1.1))
register(Method("ref_filter", pruner=filter_pruner, prune="once", batch_of_b=True,
                reference=True, options=("filter_quantile",), group="reference",
                control="reference-filter", label="reference filter (once)", cost=1.5))
register(Method("dedup_filter", pruner=dedup_pruner(True, filtered=True), prune="once",
                batch_of_b=True, reference=True, options=("filter_quantile",),
                group="reference", control="dedup + filter",
                label="dedup (near) + reference filter (once)", cost=1.6))
