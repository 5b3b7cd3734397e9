"""The regimes of tools/bench_train.py on tiny real configurations: MNIST-1D trained long (time to
uniform's plateau), fine-tuning from a cached pre-trained model, and the Transformer byte LM;
the per-epoch "already learned" diagnostic of the shared loop against a direct computation; the
plateau arithmetic; and the plan (new run keys, none of the committed evidence redone)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_train  # noqa: E402
from benchtrain import experiments as P  # noqa: E402
from benchtrain.report import plateau, summarize, time_to_target  # noqa: E402
from benchtrain.run import Data  # noqa: E402
from pipelines import loop  # noqa: E402
from pipelines.mnist1d import data as m1d_data  # noqa: E402
from pipelines.mnist1d import pretrain as pre  # noqa: E402
from pipelines.mnist1d import train as m1d  # noqa: E402
from pipelines.textlm.train import TransformerLM  # noqa: E402

b, B = 16, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def common(tmp_path: Path, *extra: str) -> list[str]:
    return ["--m1d-test", "200", "--m1d-b", str(b), "--m1d-B", str(B),
            "--out", str(tmp_path / "evidence"), "--data-dir", str(tmp_path / "data"),
            "--no-progress", *extra]


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "evidence" / "runs.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- arithmetic
def test_plateau_and_time_to_plateau_on_synthetic_curves() -> None:
    # two uniform seeds: the plateau is the mean over seeds of each one's last 3 evaluations
    u0 = [[1.0, 0.5], [2.0, 0.8], [3.0, 0.90], [4.0, 0.92], [5.0, 0.91], [6.0, 0.93]]
    u1 = [[1.1, 0.6], [2.2, 0.85], [3.3, 0.89], [4.4, 0.93], [5.5, 0.94], [6.6, 0.92]]
    value = plateau([u0, u1], 3)
    assert value == pytest.approx(((0.92 + 0.91 + 0.93) / 3 + (0.93 + 0.94 + 0.92) / 3) / 2)
    assert plateau([u0], 10) == pytest.approx(statistics.fmean(q for _, q in u0))
    with pytest.raises(ValueError, match="window"):
        plateau([u0], 0)
    # a method that gets there sooner on one seed and never on the other
    fast0 = [[0.5, 0.7], [1.0, 0.915], [1.5, 0.95]]
    fast1 = [[0.5, 0.7], [1.0, 0.8], [1.5, 0.85]]
    exp = P.Experiment("long", "long", "mnist1d", {"b": b, "B": B}, ["uniform", "es"], [0, 1],
                       group="regimes", plateau_window=3)
    recs = [{"method": m, "seed": s, "result": {
        "wall_clock_s": c[-1][0], "samples_forwarded": 1, "samples_backpropagated": 1,
        "final": c[-1][1], "best": max(q for _, q in c), "epochs": len(c), "curve": c,
        "higher_is_better": True, "quality": "test_acc",
        "learned_fraction": [0.1 * (i + 1) for i in range(len(c))]}}
        for m, cs in (("uniform", (u0, u1)), ("es", (fast0, fast1))) for s, c in enumerate(cs)]
    s = summarize(exp, recs, tolerance=0.01)
    target = value - 0.01
    assert s["plateau"] == {"window": 3, "value": pytest.approx(value), "target": pytest.approx(target)}
    # the first evaluation at or beyond the target, per seed
    assert s["methods"]["uniform"]["time_to_plateau_s"]["per_seed"] == [4.0, 4.4]
    assert s["methods"]["es"]["time_to_plateau_s"]["per_seed"] == [1.0, None]
    assert s["methods"]["es"]["time_to_plateau_s"]["reached"] == 1
    assert s["methods"]["es"]["ratio_to_uniform"]["time_to_plateau_s"] == pytest.approx(1.0 / 4.2)
    for seed, c in enumerate((u0, u1)):
        assert time_to_target(c, target, True) == s["methods"]["uniform"]["time_to_plateau_s"]["per_seed"][seed]
    # the learned fraction: per epoch, the mean over seeds, over the epochs every seed has
    assert s["methods"]["es"]["learned_fraction"] == pytest.approx([0.1, 0.2, 0.3])
    # bits per byte: lower is better, the target is the plateau plus the tolerance
    low = [[[t, 3.0 - q] for t, q in c] for c in (u0, u1)]
    assert plateau(low, 3) == pytest.approx(3.0 - value)


# ----------------------------------------------------------------------------- the loop
def small_pretrained(tmp_path: Path) -> tuple[dict, pre.PretrainConfig]:
    config = pre.PretrainConfig(source_train=2000, source_test=200, epochs=4, b=b)
    return pre.pretrain(tmp_path / "pretrain", tmp_path / "mnist1d", config, log=lambda m: None), config


def test_learned_fraction_is_the_fraction_of_samples_read_below_the_threshold(tmp_path: Path) -> None:
    # A pre-trained model (so the fraction is neither 0 nor 1) trained at lr 0: it never
    # changes, each epoch reads every sample once, so each epoch's fraction is the fraction of
    # the corpus whose loss under that model is below ln 2, computed here directly
    meta, _ = small_pretrained(tmp_path)
    d = m1d_data.build(tmp_path / "mnist1d", 300, 200, 0.0, 42, "wds")
    model = pre.Pretrained(meta["path"])()
    with torch.no_grad():
        losses = F.cross_entropy(model(torch.from_numpy(d.train_x).unsqueeze(1)),
                                 torch.from_numpy(d.y), reduction="none")
    direct = float((losses < math.log(2)).float().mean())
    assert 0.05 < direct < 0.95
    w = m1d.workload(d.corpus, d.test_x, d.test_y, make_model=pre.Pretrained(meta["path"]))
    for method in ("uniform", "es"):  # read by the training forward / the scoring forward
        r = loop.train(w, method, loop.RunConfig(2, b=b, B=B, lr=0.0, progress=False))
        assert r["learned_fraction"] == pytest.approx([direct, direct], abs=1e-9)
        # weights loaded and never changed: the run ends at the pre-trained model's accuracy
        assert r["final_acc"] == m1d.accuracy(model, d.test_x, d.test_y)
    # infobatch reads every sample in epoch 0, then prunes below-mean-loss ones: the fraction
    # is over the samples it read, so fewer of them are learned
    r = loop.train(w, "infobatch", loop.RunConfig(3, b=b, B=B, lr=0.0, progress=False))
    assert r["learned_fraction"][0] == pytest.approx(direct, abs=1e-9)
    assert r["learned_fraction"][1] < direct
    start = pre.start_diagnostics(model, d.train_x, d.y, d.test_x, d.test_y)
    assert start["learned"] == pytest.approx(direct)
    assert start["correct"] >= start["learned"]  # loss below ln 2: p(label) > 1/2, so correct
    # a workload without a threshold records nothing
    plain = dataclasses.replace(w, learned_loss=None)
    assert loop.train(plain, "es", loop.RunConfig(1, b=b, B=B, progress=False))["learned_fraction"] == []


# ----------------------------------------------------------------------------- the regimes
def test_finetune_regime_starts_every_run_from_one_cached_pretrained_model(tmp_path: Path) -> None:
    args = common(tmp_path, "--workload", "mnist1d-finetune", "--ft-train", "300",
                  "--ft-epochs", "2", "--ft-source-train", "2000", "--ft-pretrain-epochs", "4",
                  "--seeds", "0,1", "--methods", "uniform,es,random,budget_es")
    res = bench_train.main(args)
    assert res["ran"] == 8
    caches = list((tmp_path / "data" / "pretrain").iterdir())
    assert len(caches) == 1 and sorted(os.listdir(caches[0])) == ["meta.json", "model.pt"]
    meta = json.loads((caches[0] / "meta.json").read_text())
    assert meta["config"]["classes"] == [0, 1, 2, 3, 4] and meta["config"]["source_seed"] == 7
    # the source holds only the pre-training classes, generated apart from the target
    source = m1d_data.build(tmp_path / "data" / "mnist1d", 2000, 200, 0.0, 7, "wds",
                            classes=[0, 1, 2, 3, 4])
    assert set(source.y.tolist()) == {0, 1, 2, 3, 4}
    assert source.corpus.num_samples == meta["source_train_samples"] < 2000
    target = m1d_data.build(tmp_path / "data" / "mnist1d", 300, 200, 0.0, 42, "wds")
    model = pre.Pretrained(meta["path"])()
    runs = records(tmp_path)
    starts = {json.dumps(r["result"]["start"], sort_keys=True) for r in runs}
    assert len(starts) == 1  # one pre-trained model, the same start for every method and seed
    start = runs[0]["result"]["start"]
    # what the runs start from is the cached model: its accuracy, its learned fraction
    direct = pre.start_diagnostics(model, target.train_x, target.y, target.test_x, target.test_y)
    assert start["test_acc"] == direct["test_acc"] == m1d.accuracy(model, target.test_x, target.test_y)
    assert start["learned"] == direct["learned"] and start["correct"] == direct["correct"]
    assert start["test_acc"] > 0.2  # above chance (0.1): it knows half the classes
    assert start["pretrain_s"] == meta["pretrain_s"] > 0
    for r in runs:
        assert r["config"]["pretrain"] == meta["config"]
        assert len(r["result"]["learned_fraction"]) == math.ceil(r["result"]["epochs"])
    entry = json.loads((tmp_path / "evidence" / "summary.json").read_text())["mnist1d-finetune"]
    assert entry["group"] == "regimes" and entry["summary"]["start"] == start
    tables = (tmp_path / "evidence" / "tables.md").read_text()
    assert "## Regimes" in tables and "pre-trained once on" in tables
    assert "| method | final − uniform | learned: first epoch |" in tables

    # another invocation with another method reuses the cached model: not pre-trained again
    before = (caches[0] / "model.pt").stat().st_mtime_ns
    res = bench_train.main([a if a != "uniform,es,random,budget_es" else "uniform,es,loss"
                            for a in args])
    assert res["ran"] == 2 and res["skipped"] == 4
    assert (caches[0] / "model.pt").stat().st_mtime_ns == before
    assert records(tmp_path)[-1]["result"]["start"] == start


def test_long_regime_reports_the_time_to_uniforms_plateau(tmp_path: Path) -> None:
    args = common(tmp_path, "--workload", "mnist1d-long", "--long-train", "300",
                  "--long-epochs", "4", "--plateau-window", "2", "--seeds", "0,1",
                  "--methods", "uniform,es,budget_es")
    res = bench_train.main(args)
    assert res["ran"] == 6
    runs = records(tmp_path)
    for r in runs:
        assert r["config"]["epochs"] == 4 and r["result"]["train_samples"] == 300
        assert len(r["result"]["learned_fraction"]) == math.ceil(r["result"]["epochs"])
        assert all(0.0 <= f <= 1.0 for f in r["result"]["learned_fraction"])
    s = res["experiments"]["mnist1d-long"]["summary"]
    uniform = [r["result"]["curve"] for r in runs if r["method"] == "uniform"]
    value = statistics.fmean(statistics.fmean(q for _, q in c[-2:]) for c in uniform)
    assert s["plateau"]["value"] == pytest.approx(value)
    assert s["plateau"]["target"] == pytest.approx(value - 0.002)
    for method in ("uniform", "es", "budget_es"):
        curves = [r["result"]["cpu_curve"] for r in runs if r["method"] == method]  # CPU basis
        per_seed = [next((t for t, q in c if q >= value - 0.002), None) for c in curves]
        assert s["methods"][method]["time_to_plateau_s"]["per_seed"] == per_seed
    tables = (tmp_path / "evidence" / "tables.md").read_text()
    assert "plateau = mean over uniform's seeds of its last 2 evaluations" in tables
    assert "to plateau s" in tables


def test_textlm_long_regime_trains_the_transformer(tmp_path: Path) -> None:
    args = common(tmp_path, "--workload", "textlm-long", "--text-max-mb", "0.05",
                  "--text-min-mb", "0", "--text-seq-len", "32", "--text-shard-sequences", "128",
                  "--text-eval-sequences", "32", "--text-b", "8", "--text-B", "16",
                  "--tlong-train-mb", "0.008", "--tlong-epochs", "2", "--tlong-hidden", "16",
                  "--seeds", "0", "--methods", "uniform,es")
    res = bench_train.main(args)
    assert res["ran"] == 2
    n = 3 * 128  # 0.008 MiB of 4 KiB shards: the first 3
    params = sum(p.numel() for p in TransformerLM(16, 2).parameters())
    for r in records(tmp_path):
        c, out = r["config"], r["result"]
        assert (c["arch"], c["hidden"], c["layers"], c["epochs"]) == ("transformer", 16, 2, 2)
        assert out["train_samples"] == n and out["samples_forwarded"] == 2 * n
        assert len(out["learned_fraction"]) == 2
    assert res["experiments"]["textlm-long"]["summary"]["quality"] == "heldout_bpb"
    # the recorded configuration makes the Transformer
    cfg = records(tmp_path)[0]["config"]
    w = Data(tmp_path / "data").workload("textlm", cfg)
    assert sum(p.numel() for p in w.make_model().parameters()) == params


# ----------------------------------------------------------------------------- the plan
def test_regimes_are_new_experiments_and_the_committed_evidence_is_not_redone(
        tmp_path: Path, capsys) -> None:
    # against the committed runs.jsonl (read only): every issue-7 experiment has nothing to do,
    # the three regimes have all their runs to do
    res = bench_train.main(["--all", "--regimes", "--grid-seeds", "0,1", "--dry-run",
                            "--out", str(ROOT / "docs" / "evidence"),
                            "--data-dir", str(tmp_path / "nodata")])
    parts = res["estimate"]["experiments"]
    # the variants grid is new too (not in the committed evidence): one run per variant and seed
    new = {**{name: 30 for name in P.REGIMES}, "variants": 2 * len(P.VARIANTS)}
    for name, part in parts.items():
        assert part["runs"] == new.get(name, 0), name
    assert res["estimate"]["runs"] == sum(new.values())
    printed = capsys.readouterr().out
    for name in P.REGIMES:
        assert f"  {name}: " in printed
    # --all alone is the committed evidence: no regime
    exps = P.plan(P.parse_args(["--all", "--out", str(tmp_path)]))
    assert not [e for e in exps if e.group == "regimes"]
    regimes = {e.name: e for e in P.plan(P.parse_args(["--regimes", "--out", str(tmp_path)]))}
    assert list(regimes) == list(P.REGIMES)
    c = regimes["mnist1d-long"].config
    assert (c["train"], c["epochs"]) == (20000, 40) and regimes["mnist1d-long"].plateau_window == 5
    c = regimes["textlm-long"].config
    assert (c["train_mb"], c["epochs"], c["arch"]) == (8.0, 3, "transformer")
    assert P.cost_kind("textlm", c) == "textlm-transformer"
    c = regimes["mnist1d-finetune"].config
    assert c["pretrain"]["classes"] == [0, 1, 2, 3, 4] and c["epochs"] == 10
    # pre-training is priced once, and not at all once cached
    one = P.estimate([regimes["mnist1d-finetune"]], {}, tmp_path / "nodata")
    cached = tmp_path / "cached"
    cfg = pre.PretrainConfig.from_dict(c["pretrain"])
    (pre.cache_dir(cached / "pretrain", cfg)).mkdir(parents=True)
    (pre.cache_dir(cached / "pretrain", cfg) / "meta.json").write_text("{}")
    two = P.estimate([regimes["mnist1d-finetune"]], {}, cached)
    kept = cfg.source_train * len(cfg.classes) / 10
    assert one["seconds"] - two["seconds"] == pytest.approx(
        P.COSTS["mnist1d"]["uniform_s_per_sample_epoch"] * kept * cfg.epochs
        + P.COSTS["mnist1d"]["build_s"])
    assert one["runs"] == two["runs"] == 30


def test_bad_regime_settings_are_refused_naming_the_flag(tmp_path: Path, capsys) -> None:
    for bad, flag in ((["--ft-classes", "0,11"], "--ft-classes"),
                      (["--ft-classes", "1,1"], "--ft-classes"),
                      (["--plateau-window", "9", "--long-epochs", "8"], "--plateau-window"),
                      (["--long-epochs", "0"], "--long-epochs"),
                      (["--tlong-train-mb", "0"], "--tlong-train-mb")):
        with pytest.raises(SystemExit):
            P.parse_args(["--regimes", "--out", str(tmp_path), *bad])
        assert flag in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown pre-training setting"):
        pre.PretrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="classes must be distinct labels"):
        m1d_data.build(tmp_path, 100, 50, classes=[10])
