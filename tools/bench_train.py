"""Time-to-quality evidence: ES, ESWP and their peers against uniform training.

    python tools/bench_train.py --workload mnist1d --noise 0,0.2,0.4   # MNIST-1D, 3 noise levels
    python tools/bench_train.py --workload textlm                      # byte LM on stdlib text
    python tools/bench_train.py --grid betas                           # beta1 x beta2 heat map
    python tools/bench_train.py --grid ratio                           # B/b in {2, 4}
    python tools/bench_train.py --grid prune                           # ESWP pruning ratio
    python tools/bench_train.py --grid fixes                           # burn-in/anneal, longer run
    python tools/bench_train.py --grid variants                        # the selection variants
    python tools/bench_train.py --all                                  # every one of the above
    python tools/bench_train.py --all --dry-run                        # the plan and its estimate
    python tools/bench_train.py --workload mnist1d-long                # a regime (see below)
    python tools/bench_train.py --regimes                              # every regime

    # the reference-score methods: the one command for their goals (they are opt-in)
    python tools/bench_train.py --workload mnist1d --noise 0,0.2,0.4 \
        --methods uniform,rho,rho_es,band_low,band_middle,band_high,prune_random,budget_rho
    python tools/bench_train.py --workload textlm \
        --methods uniform,rho,band_low,band_middle,band_high,prune_random,budget_rho

    # the web-like stream (pipelines.webtext): a budget in passes, the curation methods
    python tools/bench_train.py --workload webtext --web-passes 0.25 --out docs/evidence/webtext \
        --methods uniform,oracle,dedup_near,dedup_filter,es,rho,budget_dedup_filter,budget_es,budget_rho

**The web-like stream** (``--workload webtext``; opt-in, not in ``--all``): the byte LM (GRU,
``--web-hidden`` 64) on a :mod:`pipelines.webtext` build of ``--web-samples`` 32,768 samples of
``--web-seq-len`` 128 B in the ``--web-mixture`` (``default``: 40% clean; ``dupes``: 20% clean,
45% duplicates), one experiment per budget of ``--web-passes`` (passes of uniform over the
stream: every method takes ``passes * samples / b`` steps, the selecting ones reading B per step,
the prune-once ones passing over their kept part as often as that takes). A budget control is
cut in passes (uncapped: a method dearer than uniform buys its control more steps). Quality:
clean held-out bits/byte; the per-kind held-out bits/byte, what each method kept and trained on
of each kind (the side table, read by the oracle only) and the goals' figures are the second
table. The reference of ``rho``, ``ref_filter`` and ``dedup_filter`` is a GRU trained on a clean
seed set (``pipelines.webtext.train.seed_set``), its training and scoring in their time.

``--all`` is the main evidence committed in ``docs/evidence`` (its dry run finds every run
done); the regimes are new experiments with run keys of their own, run with ``--regimes`` (or
``--all --regimes`` for everything).

**The regimes** the paper claims ES pays in, each a full experiment (every method, both budget
controls, the tables below) plus diagnostics (the regimes' second table):

=================== ===========================================================================
``mnist1d-long``    MNIST-1D trained to convergence: ``--long-train`` 20,000 samples,
                    ``--long-epochs`` 40 (test set, b, B, lr: the ``--m1d-*`` flags). Reports the
                    time to uniform's plateau: plateau = the mean over uniform's seeds of each
                    seed's last ``--plateau-window`` (5) evaluations; a run reaches it at its
                    first evaluation at or beyond plateau minus ``--tolerance-acc``; per seed,
                    and the mean over the seeds that reached it as a ratio to uniform's.
``mnist1d-finetune`` fine-tuning: a CNN pre-trained once (``pipelines.mnist1d.pretrain``) on
                    ``--ft-source-train`` 20,000 MNIST-1D samples generated with
                    ``--ft-source-seed`` 7 and kept only for ``--ft-classes`` 0-4 (about
                    10,000), ``--ft-pretrain-epochs`` 10, cached in ``DATA/pretrain`` by its
                    configuration; every method and seed then fine-tunes all its weights on
                    ``--ft-train`` 20,000 target samples (seed 42, all ten classes) for
                    ``--ft-epochs`` 10 at ``--ft-lr`` 1e-3. Pre-training is reported once, never
                    counted in a method's wall-clock; so are the pre-trained model's target test
                    accuracy and the fraction of target samples it already classifies correctly
                    / with loss below ln 2 when fine-tuning starts.
``textlm-long``     the byte LM with a larger budget: ``--tlong-train-mb`` 8 MiB (65,536
                    sequences of the 30.5 MB of stdlib text), ``--tlong-epochs`` 3, the
                    Transformer (``--tlong-arch``, width ``--tlong-hidden`` 64,
                    ``--tlong-layers`` 2), Adam ``--tlong-lr`` 3e-3; the rest as ``textlm``.
=================== ===========================================================================

Measured per-run costs on the 2-core machine, 1 torch thread, load ~2 (see ``COSTS`` in
``benchtrain/experiments.py``): ``mnist1d-long`` ~1.5 min a uniform run, ~35 min for 3 seeds x the 10
methods; ``mnist1d-finetune`` ~0.4 min a run, ~10 min in all, plus ~0.6 min of pre-training
once; ``textlm-long`` ~10 min a uniform run (8.5 min of it training), ~9 min per run over the
methods, ~4.7 h in all (``--methods`` trims it). The machine's speed drifts: rescaled by the
slower uniform runs committed in ``docs/evidence/runs.jsonl`` the estimate is 1.5x that (8.4 h
for the three regimes). ``--regimes --dry-run`` prints it.

**Diagnostics** (every experiment whose runs recorded them; the regimes' second table): the
scoring forward's cost per sample relative to a training sample (F/T, below), and per epoch the
fraction of the samples read that the model had already learned — loss below ln 2 just before
the step that read them (classified correctly with probability > 1/2; under 1 bit per byte),
measured by the shared loop on the losses each method computes anyway.

**The fixes grid** tries, on clean MNIST-1D, what could close a gap between ES and uniform without
tuning for this benchmark: ``fix-schedule`` (the paper's burn-in and annealing: ``--fix-burn-in``
and ``--fix-anneal`` of the steps select uniformly) and ``fix-epochs`` (``--fix-epochs`` epochs,
a longer run where uniform has flattened, so fewer samples back-propagated per epoch may cost
less quality); the first with uniform, ES, ESWP and both budget-matched controls, the second with
uniform, ES and ES's control.

**What one experiment runs.** On the same shards and epoch budget, with every seed of
``--seeds`` (default 0,1,2), each method of ``--methods`` (default all of them):

=================== ===========================================================================
``uniform``         standard training, batches of b (the reference)
``uniform_B``       standard training, batches of B (same peak LR, half the steps at B = 2b)
``es``              Evolved Sampling: no-grad forward on B, ES picks b (beta1, beta2)
``eswp``            ES + ESWP pruning of ``--eswp-ratio`` of the set at epoch ends
``loss``            p proportional to the current loss, b of B
``selective_backprop`` Jiang et al. 2019 (Composer's rule), b of B
``infobatch``       InfoBatch-style pruning (uniform batches of b, below-mean losses pruned)
``random``          the random-selection control: forward on B, b picked uniformly
``topk``            the b largest losses of B, deterministically (not in the default ``--methods``)
``budget_es``       the budget-matched control: uniform training cut to ES's wall-clock
``budget_eswp``     the same, cut to ESWP's wall-clock
``budget_infobatch`` the same, cut to InfoBatch's wall-clock (not in the default ``--methods``)
=================== ===========================================================================

**The variants grid** (``--grid variants``; on MNIST-1D at
``--grid-noise``, beside uniform, ES, ESWP, InfoBatch and random; not in the main tables unless
named in ``--methods``):

=================== ===========================================================================
``eswp_rescale``    ESWP pruning only below-mean scores, kept ones weighted 1/pi (unbiased;
                    ``--rescale-min-keep``)
``infobatch_es``    InfoBatch on ES's EMA scores, from the training losses (no scoring forward)
``es_reweight``     ES with unbiased importance weights on the b selected losses
``es_to_uniform``   ES with b ramped to B over ``--b-ramp`` of training (no scoring at b = B)
``es_from_uniform`` the reverse: b = B first, ramped down to b at the end
``es_fresh``        ES scoring only samples not scored within ``--fresh-epochs``
=================== ===========================================================================

**The reference-score methods** (``docs/REFERENCE.md``; opt-in, so the main
evidence's run keys stay as committed):

=================== ===========================================================================
``rho``             RHO-LOSS: forward on B, back-propagate the b with the largest reducible loss
                    (loss minus the reference model's loss; ``ReducibleLossSelector`` "topk")
``rho_es``          the ES rule (Gumbel-top-k on EMA scores) on the reducible loss
``band_low``,       uniform batches of b on the ``--prune-keep`` 0.5 of the corpus in the low /
``band_middle``,    middle / high band of the reference losses, pruned once before training
``band_high``       (prune-once manifests), ``epochs`` epochs over the kept part
``prune_random``    the control: as many samples kept at random, the same path and epochs (the
                    same training compute as each band by construction)
``rs2``             RS2 (Okanovic et al. 2024): a fresh random ``--prune-keep`` share of the
                    corpus each epoch, the first included, without replacement across epochs
                    (``es_stream.RS2Policy``; no reference: ``prune_keep`` of the time per
                    epoch, its control ``budget_rs2``)
``budget_rho``      uniform cut to RHO-LOSS's wall-clock, reference included
=================== ===========================================================================

The reference model (``pipelines.reference``; RHO-LOSS's protocol) trains on a held-out split
with the training set's label noise and no clean label: MNIST-1D samples generated with
``--reference-seed`` 1042 (never the corpus's 42), textlm train shards after those trained on. Its
size, held-out size, epochs and LR are the ``--reference-*`` flags (defaults per workload:
MNIST-1D a width-16 CNN on 10,000 samples for 10 epochs, textlm a GRU of hidden size 64 on 4,096
sequences for 2 epochs); they key only the runs of ``rho``, ``rho_es`` and the bands. It is
trained and the corpus scored (``es_stream.score_corpus``, the pass of ``es-stream score``) once
per (data, reference config), cached in ``DATA/reference``; its training and scoring seconds
are **added** to each of those methods' wall-clock and time to target (every run pays it in
full) and shown on their own (the ``of it ref s`` column and a line above the table). The
**Goals** table after the experiments reads, per method: under label noise, the fraction of the
accuracy noise costs uniform that it wins back (needs the clean ``--noise 0`` experiment in the
same invocation) and its wall-clock to uniform's final accuracy over uniform's (goal: >= 0.5 and
<= 0.6x); clean MNIST-1D and textlm: lossless in <= 0.8x; each band against random pruning.

Every run goes through the pipelines' one training loop (``pipelines.loop.train``, every method
declared once in the method registry ``pipelines.methods``) on the pipelines' workloads
(``pipelines.mnist1d.train.workload``, ``pipelines.textlm.train.workload``), so the benchmark
measures exactly what the pipelines run.

**How the budget-matched control is cut.** Uniform and ES (ESWP) run first, every seed. Then
``E_cut = epochs * mean(ES train s) / mean(uniform train s)`` (means over seeds, rounded to 0.001
epoch, at most ``epochs``): the uniform time per epoch is constant, so ``E_cut`` epochs of uniform
take ES's wall-clock. The control trains uniform batches of b for ``E_cut`` epochs — the last
epoch stops part-way — with the cosine learning-rate schedule compressed to span ``E_cut`` epochs
(so it ends at lr 0 like every other run). Its measured wall-clock is reported beside ES's, so the
assumption can be checked in the table.

**What is reported**, per method (mean ± std over seeds): training wall-clock (evaluation
excluded), samples forwarded (read and passed through the model, scoring forwards included) and
back-propagated, final and best quality (MNIST-1D: test accuracy, higher is better; textlm:
held-out bits per byte, lower is better), and time-to-target: the training wall-clock at the
first evaluation whose quality reaches ``target = uniform's mean final quality - tolerance``
(``+ tolerance`` for bits per byte; ``--tolerance-acc`` 0.002, ``--tolerance-bpb`` 0.01), with how
many seeds reached it (summary.json also has the time to uniform's mean final quality itself,
tolerance 0). Each also as a ratio to uniform's mean. The MNIST-1D tolerance is small because
uniform's accuracy curve is flat near its end: at 0.005 uniform itself reached the target half-way
through its run (measured, 40k samples, 10 epochs), which measures early progress, not the end. "lossless" marks a mean final
quality no worse than uniform's mean minus one standard deviation of uniform's seeds.

**Outputs** (``--out``, default ``docs/evidence/``): ``runs.jsonl`` (one JSON line per finished
run, appended as each one ends: an interrupted invocation rerun with the same arguments skips
every run already there — runs are keyed by everything that determines them, so experiments that
share a run, e.g. the grids' reference cells, run it once), ``summary.json`` (every experiment's
configuration, machine, command and summary), ``tables.md`` (all tables), ``<experiment>.png``
(quality against training wall-clock, one colour per method, thin lines per seed, the target
dashed) and ``betas_heatmap.png``. Data are cached in ``--data-dir`` (default
``out/bench_data``, not committed).

**Estimate.** ``--all`` (and any invocation) prints the number of runs to do and an estimate of
the wall time before starting, from per-workload costs measured on the 2-core development machine
(``COSTS``), rescaled by the uniform runs already in ``runs.jsonl`` when there are any.

**Code.** This file is the command line; the work is in ``tools/benchtrain/``: ``cli.py`` (flags
and their checks), ``experiments.py`` (experiments, run keys, budget cuts, the estimate), ``run.py``
(data, one run through the shared loop, the ``runs.jsonl`` store) and ``report.py`` (statistics,
tables, summary, plots). The methods, their options and controls: ``pipelines/methods.py``.
"""


from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchtrain.experiments import estimate, experiment_records, parse_args, plan
from benchtrain.report import (describe, diagnostics_table, goals_table, markdown_table,
                               plot_experiment, plot_heatmap, summary_entry, web_table,
                               write_tables, write_text)
from benchtrain.run import Data, RunLog, execute


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"experiments": {name: summary entry}, "ran", "skipped",
    "estimate", "out"}`` (the entries are also in ``OUT/summary.json``)."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_train.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    store = RunLog(out / "runs.jsonl", args.time)
    exps = plan(args)
    est = estimate(exps, store.records, Path(args.data_dir))
    print(f"bench_train: {len(exps)} experiment(s), {est['runs']} run(s) to do "
          f"({len(store.records)} finished run(s) in {store.path}); estimated "
          f"{est['seconds'] / 60:.0f} min of wall time (costs measured on the 2-core development "
          f"machine; see COSTS)", flush=True)
    if args.dry_run:
        for exp in exps:
            part = est["experiments"][exp.name]
            print(f"  {exp.name}: {', '.join(exp.methods)} x seeds {exp.seeds}: "
                  f"{part['runs']} run(s) to do, ~{part['seconds'] / 60:.1f} min")
        return {"experiments": {}, "ran": 0, "skipped": 0, "estimate": est, "out": str(out)}

    def log(msg: str) -> None:
        print(msg, flush=True)

    summary_path = out / "summary.json"
    entries: dict[str, dict[str, Any]] = (json.loads(summary_path.read_text())
                                          if summary_path.exists() else {})
    data = Data(Path(args.data_dir))
    ran = skipped = 0
    started = time.perf_counter()
    for exp in exps:
        res = execute(exp, store, data, not args.no_progress, log)
        ran, skipped = ran + res["ran"], skipped + res["skipped"]
        records = experiment_records(exp, store.records, res["cuts"])
        tol = args.tolerance_acc if exp.workload == "mnist1d" else args.tolerance_bpb
        entry = summary_entry(exp, records, res["cuts"], tol, command)
        if exp.plot and records:
            png = out / f"{exp.name}.png"
            plot_experiment(exp, records, entry["summary"], png)
            entry["plot"] = str(png)
        entries[exp.name] = entry
        plot_heatmap(entries, out / "betas_heatmap.png")
        write_text(summary_path, json.dumps(entries, indent=1))
        write_tables(out, entries)
        if exp.group in ("main", "fixes", "regimes", "web"):
            print(f"\n## {exp.title}\n{describe(entry)}\n\n{markdown_table(entry)}\n", flush=True)
        if exp.group == "regimes":
            print(f"{diagnostics_table(entry)}\n", flush=True)
        if exp.group == "web":
            print(f"{web_table(entry)}\n", flush=True)
    goals = goals_table({e.name: entries[e.name] for e in exps})
    if goals:
        print("\n".join(goals), flush=True)
    print(f"bench_train: ran {ran}, skipped {skipped} already finished, in "
          f"{(time.perf_counter() - started) / 60:.1f} min; tables: {out / 'tables.md'}; "
          f"summary: {summary_path}; runs: {store.path}", flush=True)
    return {"experiments": {e.name: entries[e.name] for e in exps}, "ran": ran,
            "skipped": skipped, "estimate": est, "out": str(out)}


if __name__ == "__main__":
    main()
