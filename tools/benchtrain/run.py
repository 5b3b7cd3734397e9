"""Running of ``tools/bench_train.py``: the data sets, one run through the shared training loop
(:func:`pipelines.loop.train`) and the resumable ``runs.jsonl`` store."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from pipelines import methods as registry
from pipelines.common import ES_OPTIONS, PRUNE_OPTIONS, torch_threads

from .experiments import VARIANT_OPTIONS, Experiment, Run, budget_cuts, budget_runs, measured_runs

#: the ``quality`` recorded in runs.jsonl for each workload's held-out quality
QUALITY = {"mnist1d": "test_acc", "textlm": "heldout_bpb", "webtext": "heldout_bpb"}


TIME_BASES = ("cpu", "wall")


def on_time_basis(rec: dict[str, Any], basis: str) -> dict[str, Any]:
    """``rec`` with its result's times (``wall_clock_s``, ``curve``, ``reference_s``,
    ``train_wall_clock_s``) on ``basis``: ``"cpu"`` puts the run's CPU seconds there
    (:func:`pipelines.loop.cpu_seconds`; the wall-clock moves to ``measured_wall_clock_s``),
    ``"wall"`` leaves them. A run recorded before CPU time was (no ``cpu_s``) stays on wall-clock.
    ``result["time_basis"]`` says which the record is on; the planning and the report read only
    the rewritten keys, so every comparison is on one basis."""
    r = rec["result"]
    if basis not in TIME_BASES:
        raise ValueError(f"time basis must be one of {TIME_BASES}, got {basis!r}")
    if basis == "wall" or "cpu_s" not in r:
        return {**rec, "result": {**r, "time_basis": "wall"}}
    out = {**r, "time_basis": "cpu", "measured_wall_clock_s": r["wall_clock_s"],
           "wall_clock_s": r["cpu_s"], "curve": r["cpu_curve"]}
    if "reference_s" in r:
        out.update(reference_s=r["reference_cpu_s"],
                   train_wall_clock_s=r["cpu_s"] - r["reference_cpu_s"])
    return {**rec, "result": out}


class RunLog:
    """``runs.jsonl``: one line per finished run, appended and flushed as it ends. A line cut
    short by a kill is ignored (and that run redone). ``records`` are on ``time_basis``
    (:func:`on_time_basis`); the file keeps both times as measured."""

    def __init__(self, path: Path, time_basis: str = "cpu") -> None:
        self.path = path
        self.time_basis = time_basis
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec and "result" in rec:
                    self.records[rec["key"]] = on_time_basis(rec, time_basis)

    def add(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_bytes() if self.path.exists() else b""
        with open(self.path, "a") as f:
            if text and not text.endswith(b"\n"):  # a torn last line: end it, it stays ignored
                f.write("\n")
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = on_time_basis(rec, self.time_basis)


class Data:
    """Built data sets, one per workload configuration, built when first needed, and the
    workloads of the shared loop on them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, Any] = {}

    def mnist1d(self, cfg: dict[str, Any]):
        from pipelines.mnist1d.data import build

        key = json.dumps(["mnist1d", cfg["train"], cfg["test"], cfg["noise"], cfg["data_seed"]])
        if key not in self.cache:
            self.cache[key] = build(self.root / "mnist1d", cfg["train"], cfg["test"], cfg["noise"],
                                    cfg["data_seed"], "wds")
        return self.cache[key]

    def textlm(self, cfg: dict[str, Any]):
        from pipelines.textlm.__main__ import build_data
        from pipelines.textlm.train import eval_subset

        fields = ("source", "min_mb", "max_mb", "seq_len", "shard_sequences", "heldout_fraction",
                  "data_seed", "train_mb", "eval_sequences")
        key = json.dumps(["textlm"] + [cfg[f] for f in fields])
        if key not in self.cache:
            data = build_data(argparse.Namespace(**cfg), self.root / "textlm")
            self.cache[key] = (data, eval_subset(data.heldout, cfg["eval_sequences"] or None))
        return self.cache[key]

    def webtext(self, cfg: dict[str, Any]):
        """The web-like stream of ``cfg`` (:func:`pipelines.webtext.build` with the named
        mixture), built under ``root/webtext`` the first time."""
        from pipelines.webtext.corpus import build
        from pipelines.webtext.train import mixture

        key = json.dumps(["webtext", cfg["mixture"], cfg["samples"], cfg["seq_len"],
                          cfg["data_seed"]])
        if key not in self.cache:
            self.cache[key] = build(self.root / "webtext", mixture=mixture(cfg["mixture"]),
                                    samples=cfg["samples"], seq_len=cfg["seq_len"],
                                    seed=cfg["data_seed"], min_bytes=0)
        return self.cache[key]

    def pretrained(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The fine-tuning regime's pre-trained model of ``cfg["pretrain"]`` (its meta.json,
        :func:`pipelines.mnist1d.pretrain.pretrain`): built under ``root/pretrain`` the first
        time, then reused by every method and seed."""
        from pipelines.mnist1d.pretrain import PretrainConfig, pretrain

        config = PretrainConfig.from_dict(cfg["pretrain"])
        key = "pretrain-" + config.key()
        if key not in self.cache:
            self.cache[key] = pretrain(self.root / "pretrain", self.root / "mnist1d", config)
        return self.cache[key]

    def start(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """What the pre-trained model of a fine-tuning ``cfg`` knows of the target before any
        method trains (:func:`pipelines.mnist1d.pretrain.start_diagnostics`) and what
        pre-training cost."""
        from pipelines.mnist1d.pretrain import Pretrained, start_diagnostics

        meta = self.pretrained(cfg)
        key = json.dumps(["start", meta["key"], cfg["train"], cfg["test"], cfg["noise"],
                          cfg["data_seed"]])
        if key not in self.cache:
            d = self.mnist1d(cfg)
            diag = start_diagnostics(Pretrained(meta["path"])(), d.train_x, d.y, d.test_x,
                                     d.test_y)
            self.cache[key] = {**diag, "pretrain_s": meta["pretrain_s"],
                               "pretrain_total_s": meta["total_s"],
                               "source_acc": meta["source_acc"],
                               "source_train_samples": meta["source_train_samples"],
                               "pretrain_key": meta["key"]}
        return self.cache[key]

    def reference(self, name: str, cfg: dict[str, Any]):
        """The reference of workload ``name`` under run config ``cfg`` (``cfg["ref_model"]``,
        a :class:`pipelines.reference.ReferenceConfig`): a :class:`pipelines.loop.Reference`,
        trained and scored under ``root/reference`` the first time (the MNIST-1D held-out split
        built under ``root/mnist1d``), then reused by every method and seed."""
        from pipelines.reference import ReferenceConfig, mnist1d_reference, textlm_reference

        config = ReferenceConfig(**cfg["ref_model"])
        if name == "webtext":
            from pipelines.webtext.train import webtext_reference

            key = json.dumps(["reference", name, [cfg[f] for f in (
                "mixture", "samples", "seq_len", "data_seed", "eval_sequences", "device")],
                cfg.get("seed_set"),
                config.to_dict()])
            if key not in self.cache:
                self.cache[key], _ = webtext_reference(
                    self.root / "reference", self.webtext(cfg), self.workload(name, cfg), config,
                    spread=cfg.get("seed_set") == "spread")
            return self.cache[key]
        if name == "mnist1d":
            key = json.dumps(["reference", name, cfg["train"], cfg["test"], cfg["noise"],
                              cfg["data_seed"], config.to_dict()])
        else:
            fields = ("source", "min_mb", "max_mb", "seq_len", "shard_sequences",
                      "heldout_fraction", "data_seed", "train_mb", "eval_sequences", "device")
            key = json.dumps(["reference", name, [cfg[f] for f in fields], config.to_dict()])
        if key not in self.cache:
            if name == "mnist1d":
                ref, _ = mnist1d_reference(self.root / "mnist1d", self.root / "reference",
                                           self.mnist1d(cfg), cfg["noise"], cfg["data_seed"],
                                           config)
            else:
                data, heldout = self.textlm(cfg)
                target = self.workload(name, {k: v for k, v in cfg.items() if k != "pretrain"})
                ref, _ = textlm_reference(self.root / "reference", data, heldout, target, config)
            self.cache[key] = ref
        return self.cache[key]

    def workload(self, name: str, cfg: dict[str, Any]):
        """The :class:`pipelines.loop.Workload` of workload ``name`` under run config ``cfg``
        (with ``cfg["pretrain"]``: starting from that pre-trained model)."""
        if name == "mnist1d":
            from pipelines.mnist1d.pretrain import Pretrained
            from pipelines.mnist1d.train import workload

            d = self.mnist1d(cfg)
            make_model = Pretrained(self.pretrained(cfg)["path"]) if "pretrain" in cfg else None
            return workload(d.corpus, d.test_x, d.test_y, make_model)
        if name == "webtext":
            from pipelines.webtext.train import workload as web_workload

            return web_workload(self.webtext(cfg), cfg["eval_sequences"], cfg["per_kind"],
                                cfg["arch"], cfg["hidden"], cfg["embed"], cfg["layers"],
                                device=cfg["device"])
        from pipelines.textlm.train import workload

        d, heldout = self.textlm(cfg)
        return workload(d.corpus, heldout, cfg["arch"], cfg["hidden"], cfg["embed"],
                        cfg["layers"], device=cfg["device"])


def loop_config(method: str, seed: int, cfg: dict[str, Any], progress: bool,
                reference: Any = None):
    """The shared loop's :class:`pipelines.loop.RunConfig` of one benchmark run (``cfg``: its
    :func:`~.plan.run_config`). ``uniform_B`` trains uniform batches of B; a budget control
    trains uniform batches of b for ``ceil(budget_epochs)`` epochs, cut at ``budget_epochs``
    (the schedule spans the cut). Options a method does not use are not in ``cfg``: the loop's
    defaults stand, unused. ``reference``: the :class:`pipelines.loop.Reference` of a method
    that reads one."""
    from pipelines.loop import RunConfig

    b = cfg["B"] if method == registry.UNIFORM_B else cfg["b"]
    budget = cfg.get("budget_epochs")
    if "passes" in cfg:   # the web stream: a budget in passes (a control's cut is one too)
        return RunConfig(1, b=b, B=cfg.get("B", b), lr=cfg["lr"], seed=seed,
                         workers=cfg["workers"], progress=progress,
                         es_options={k: cfg[k] for k in ES_OPTIONS if k in cfg},
                         **{k: cfg[k] for k in PRUNE_OPTIONS + VARIANT_OPTIONS if k in cfg},
                         budget_passes=cfg["passes"] if budget is None else budget,
                         evals_per_run=cfg["evals_per_run"], reference=reference,
                         prune_keep=cfg.get("prune_keep", 0.5),
                         filter_quantile=cfg.get("filter_quantile", 0.95))
    return RunConfig(cfg["epochs"] if budget is None else math.ceil(budget), b=b,
                     B=cfg.get("B", b), lr=cfg["lr"], seed=seed, workers=cfg["workers"],
                     progress=progress, es_options={k: cfg[k] for k in ES_OPTIONS if k in cfg},
                     **{k: cfg[k] for k in PRUNE_OPTIONS + VARIANT_OPTIONS if k in cfg},
                     budget_epochs=budget,
                     evals_per_epoch=cfg.get("evals_per_epoch", 1), reference=reference,
                     prune_keep=cfg.get("prune_keep", 0.5))


def loop_method(method: str) -> str:
    """The loop's method of a benchmark method: uniform batches for ``uniform_B`` and the
    budget controls."""
    return ("uniform" if method == registry.UNIFORM_B or method in registry.controls()
            else method)


def _reads_reference(method: str) -> bool:
    """Whether a benchmark method reads a reference model (uniform_B and the controls do not)."""
    return method in registry.names() and registry.get(method).reference


def train_one(data: Data, workload: str, method: str, seed: int, cfg: dict[str, Any],
              progress: bool) -> dict[str, Any]:
    """Train one (method, seed) through the shared loop and return its normalised result."""
    from pipelines.loop import train

    with torch_threads(cfg["threads"]):
        reference = data.reference(workload, cfg) if _reads_reference(method) else None
        config = loop_config(method, seed, cfg, progress, reference)
        w = data.workload(workload, cfg)
        r = train(w, loop_method(method), config)
    out = {"wall_clock_s": r["wall_clock_s"], "cpu_s": r["cpu_s"],
           "cpu_curve": [list(p) for p in r["cpu_curve"]], "samples_forwarded": r["samples_forwarded"],
           "samples_backpropagated": r["samples_backpropagated"], "steps": r["steps"],
           "epochs": config.epochs if config.budget_epochs is None else config.budget_epochs,
           "train_samples": w.corpus.num_samples, "quality": QUALITY[workload],
           "higher_is_better": w.higher_is_better, "final": r[f"final_{w.quality}"],
           "best": r[f"best_{w.quality}"], "curve": [list(p) for p in r["curve"]],
           "learned_fraction": r["learned_fraction"]}
    for k in ("backpropagated_by_kind", "samples_by_kind", "kept_by_kind", "final_metrics"):
        if k in r:   # the web stream's side table and per-kind held-out figures
            out[k] = r[k]
    if "passes" in cfg:
        out["epochs"] = r["epochs_done"]
        out["passes"] = cfg["passes"] if cfg.get("budget_epochs") is None else cfg["budget_epochs"]
    if "pretrain" in cfg:
        out["start"] = data.start(cfg)
    if reference is not None:   # in wall_clock_s and the curve already (the loop adds it)
        out.update(reference_s=r["reference_s"], reference_train_s=r["reference_train_s"],
                   reference_score_s=r["reference_score_s"], reference_name=reference.name,
                   reference_cpu_s=r["reference_cpu_s"],
                   train_wall_clock_s=r["wall_clock_s"] - r["reference_s"])
    return out


def execute(exp: Experiment, store: RunLog, data: Data, progress: bool,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Run what is missing of ``exp``: uniform and the measured methods first, every seed, then
    the budget-matched controls, cut from what those measured. Returns ``{"ran": n,
    "skipped": n, "cuts": {...}}``; a run already in ``store`` is skipped."""
    counts = {"ran": 0, "skipped": 0}
    if "pretrain" in exp.config and any(r.key not in store.records for r in measured_runs(exp)):
        with torch_threads(exp.config["threads"]):  # before the runs: in no run's run_s
            data.pretrained(exp.config)
    for run in measured_runs(exp):
        if _reads_reference(run.method) and run.key not in store.records:
            with torch_threads(exp.config["threads"]):  # before the run: in no run's run_s
                data.reference(exp.workload, run.config)
        _run_missing(exp, run, store, data, progress, log, counts)
    cuts = budget_cuts(exp, store.records)
    controls = registry.controls()
    missing = [m for m in exp.methods if m in controls and m not in cuts]
    if missing:
        raise RuntimeError(f"{exp.name}: {', '.join(missing)} need(s) every seed of uniform and "
                           f"{', '.join(controls[m] for m in missing)} first")
    for run in budget_runs(exp, cuts):
        _run_missing(exp, run, store, data, progress, log, counts)
    return {**counts, "cuts": cuts}


def _run_missing(exp: Experiment, run: Run, store: RunLog, data: Data, progress: bool,
                 log: Callable[[str], None], counts: dict[str, int]) -> None:
    """Train ``run`` and record it, unless ``store`` has it already."""
    if run.key in store.records:
        counts["skipped"] += 1
        return
    log(f"[{exp.name}] {run.method} seed {run.seed} ...")
    t0 = time.perf_counter()
    result = train_one(data, exp.workload, run.method, run.seed, run.config, progress)
    rec = {"key": run.key, "workload": exp.workload, "method": run.method, "seed": run.seed,
           "config": run.config, "result": result, "run_s": time.perf_counter() - t0,
           "finished": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine()}
    store.add(rec)
    counts["ran"] += 1
    log(f"[{exp.name}] {run.method} seed {run.seed}: train {result['wall_clock_s']:.1f} s "
        f"({result['cpu_s']:.1f} CPU s), "
        f"final {result['final']:.4f}, best {result['best']:.4f} (run {rec['run_s']:.1f} s)")


def machine() -> dict[str, Any]:
    """CPU, CPU count, Python, torch and platform of this machine (recorded with each run)."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host_cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}

