"""Reference scoring pass (es_stream.score_corpus, `es-stream score`): exactly once over real
shards, real DataLoader workers, real gloo ranks, and a real SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARD_SIZES, payload
from es_stream import Corpus, ScoreError, ScoreStore
from es_stream.reference_scoring import progress_path, score_corpus
from es_stream.store import read_metadata

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))
N = sum(SHARD_SIZES)

# A deterministic "reference model" as a user would write it: a module with a factory.
REFMODEL = '''
import os, time
import torch
from es_stream import Scorer

def features(blobs):
    return torch.stack([torch.frombuffer(bytearray(b[:64]), dtype=torch.uint8).float() / 255
                        for b in blobs])

def factory():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1)
    delay = float(os.environ.get("REFMODEL_DELAY", "0"))
    log = os.environ.get("REFMODEL_LOG")

    def score_fn(batch):
        if delay:
            time.sleep(delay)
        if log:  # which samples this process scored, by key
            with open(os.path.join(log, f"{os.getpid()}.txt"), "a") as f:
                f.write("\\n".join(batch["__key__"]) + "\\n")
        return model(features(batch["bin"])).squeeze(1).abs() + batch["cls"].float()

    return Scorer(score_fn=score_fn, model=model)

def not_a_scorer():
    return 42
'''


def expected_scores(tmp_path: Path) -> np.ndarray:
    sys.path.insert(0, str(tmp_path))
    try:
        import refmodel  # noqa: F401
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1)
    x = refmodel.features([payload(i) for i in range(N)])
    with torch.no_grad():
        return (model(x).squeeze(1).abs() + torch.arange(N).remainder(10).float()).numpy()


@pytest.fixture
def setup(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    (tmp_path / "refmodel.py").write_text(REFMODEL)
    sys.modules.pop("refmodel", None)
    return corpus, tmp_path


def cli(tmp_path: Path, *args: str, env: dict | None = None, wait: bool = True):
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [EXE, *args]
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


def score_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["score", "--corpus", str(tmp_path / "corpus.parquet"), "--model", "refmodel:factory",
            "--out", str(out), "--meta-batch-size", "4", "--no-progress", *extra]


def logged_keys(log: Path) -> list[str]:
    return [k for f in sorted(log.glob("*.txt")) for k in f.read_text().split()]


@pytest.mark.parametrize("kind", ["wds", "mds"])
def test_every_sample_scored_exactly_once_with_three_workers(kind, wds_dir, mds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(mds_dir)
    seen: list[int] = []

    def score_fn(batch):  # the sample's own value, so a wrong id would show
        key = "cls" if kind == "wds" else "idx"
        values = batch[key].float() if kind == "mds" else torch.tensor(
            [payload(int(k[6:]))[0] for k in batch["__key__"]], dtype=torch.float32)
        seen.extend(batch[key].tolist() if kind == "mds" else [int(k[6:]) for k in batch["__key__"]])
        return values + 0.5

    result = score_corpus(corpus, score_fn, tmp_path / "ref.npy", meta_batch_size=4,
                          num_workers=3, checkpoint_every=2, progress=False)
    assert sorted(seen) == list(range(corpus.num_samples))  # each sample once, none missed
    assert result.scored == corpus.num_samples
    expected = (np.arange(corpus.num_samples, dtype=np.float32) if kind == "mds" else
                np.array([payload(i)[0] for i in range(corpus.num_samples)], np.float32)) + 0.5
    np.testing.assert_array_equal(np.load(tmp_path / "ref.npy"), expected)
    meta = read_metadata(tmp_path / "ref.npy")
    assert meta["corpus_fingerprint"] == corpus.fingerprint
    assert meta["reference"]["complete"] is True and "score_fn" in meta["reference"]["scorer"]
    assert not os.path.exists(progress_path(tmp_path / "ref.npy"))


def test_cli_scores_with_a_model_factory_and_records_the_scorer(setup):
    corpus, tmp_path = setup
    out = tmp_path / "scores.npy"
    result = cli(tmp_path, *score_args(tmp_path, out, "--workers", "3"))
    assert result.returncode == 0, result.stderr
    assert f"scored {N} samples" in result.stdout
    np.testing.assert_allclose(np.load(out), expected_scores(tmp_path), rtol=1e-6)
    scorer = read_metadata(out)["reference"]["scorer"]
    assert scorer.startswith("refmodel:factory@") and len(scorer) > len("refmodel:factory@")
    again = cli(tmp_path, *score_args(tmp_path, out, "--workers", "3"))
    assert again.returncode == 0 and "already complete" in again.stdout


def test_two_gloo_ranks_each_score_their_part_and_merge(setup):
    corpus, tmp_path = setup
    out, log = tmp_path / "scores.npy", tmp_path / "log"
    log.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", REFMODEL_LOG=str(log))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "es_stream.cli",
           *score_args(tmp_path, out, "--workers", "2")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    keys = logged_keys(log)
    assert len(list(log.glob("*.txt"))) == 2  # both ranks scored (in their main processes)
    assert sorted(keys) == [f"sample{i:06d}" for i in range(N)]  # exactly once over both ranks
    np.testing.assert_allclose(np.load(out), expected_scores(tmp_path), rtol=1e-6)
    assert read_metadata(out)["reference"]["complete"] is True
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("scores"))
    assert leftovers == ["scores.meta.json", "scores.npy"]  # rank 1's working files are gone


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_store(setup):
    corpus, tmp_path = setup
    whole = tmp_path / "whole.npy"
    assert cli(tmp_path, *score_args(tmp_path, whole, "--workers", "2")).returncode == 0

    out, log = tmp_path / "killed.npy", tmp_path / "log"
    log.mkdir()
    proc = cli(tmp_path, *score_args(tmp_path, out, "--workers", "2", "--checkpoint-every", "2"),
               env={"REFMODEL_DELAY": "0.15", "REFMODEL_LOG": str(log)}, wait=False)
    progress = Path(progress_path(out))
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and json.loads(progress.read_text())["dataset"]["batches"] >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress.exists(), proc.stderr.read()
    first = logged_keys(log)
    assert 0 < len(first) < N  # killed mid-run
    assert read_metadata(out)["reference"]["complete"] is False
    # an unfinished reference store is refused by prune
    pruned = cli(tmp_path, "prune", "--scores", str(out), "--corpus", str(tmp_path / "corpus.parquet"),
                 "--policy", "band", "--band", "low", "--keep", "0.5", "--out", str(tmp_path / "m"))
    assert pruned.returncode == 1 and "unfinished reference scoring pass" in pruned.stderr

    for f in log.glob("*.txt"):
        f.unlink()
    resumed = cli(tmp_path, *score_args(tmp_path, out, "--workers", "2", "--checkpoint-every", "2"),
                  env={"REFMODEL_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stdout
    second = logged_keys(log)
    assert len(second) < N  # it went on, it did not start over
    assert set(first) | set(second) == {f"sample{i:06d}" for i in range(N)}  # nothing missed
    assert np.load(out).tobytes() == np.load(whole).tobytes()
    assert read_metadata(out)["reference"]["complete"] is True
    assert not progress.exists()


def test_resume_with_other_workers_is_refused_naming_the_progress_file(setup):
    corpus, tmp_path = setup
    out = tmp_path / "s.npy"
    proc = cli(tmp_path, *score_args(tmp_path, out, "--workers", "2", "--checkpoint-every", "1"),
               env={"REFMODEL_DELAY": "0.2"}, wait=False)
    progress = Path(progress_path(out))
    deadline = time.time() + 120
    while not progress.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli(tmp_path, *score_args(tmp_path, out, "--workers", "3"))
    assert result.returncode == 1
    assert str(progress) in result.stderr and "num_workers" in result.stderr


def test_refuses_other_corpus_other_scorer_and_foreign_files(setup, tmp_path):
    corpus, _ = setup
    out = tmp_path / "ref.npy"
    score_corpus(corpus, lambda b: b["cls"].float() + 1, out, meta_batch_size=8, num_workers=0,
                 scorer="a", progress=False)
    before = out.read_bytes()
    with pytest.raises(ScoreError, match="scorer 'a'.*this run's scorer is 'b'"):
        score_corpus(corpus, lambda b: b["cls"].float(), out, num_workers=0, scorer="b",
                     progress=False)
    other_dir = tmp_path / "other"
    from conftest import write_wds
    write_wds(other_dir, sizes=(30, 20), start=100)
    other = Corpus.from_webdataset(str(other_dir))
    with pytest.raises(ScoreError, match="another corpus"):
        score_corpus(other, lambda b: b["cls"].float(), out, num_workers=0, scorer="a",
                     progress=False)
    assert out.read_bytes() == before  # nothing was overwritten
    foreign = tmp_path / "mine.npy"
    np.save(foreign, np.ones(N, np.float32))
    ScoreStore.open(foreign, N).save(foreign)  # a training store with metadata, not a reference
    kept = foreign.read_bytes()
    with pytest.raises(ScoreError, match="no `es-stream score`.*not overwritten"):
        score_corpus(corpus, lambda b: b["cls"].float(), foreign, num_workers=0, progress=False)
    assert foreign.read_bytes() == kept


def test_score_fn_must_return_one_loss_per_sample(setup, tmp_path):
    corpus, _ = setup
    with pytest.raises(ValueError, match=r"score_fn gave \(\) for a meta-batch of 4 samples"):
        score_corpus(corpus, lambda b: b["cls"].float().mean(), tmp_path / "x.npy",
                     meta_batch_size=4, num_workers=0, progress=False)
    with pytest.raises(ScoreError, match="non-finite"):
        score_corpus(corpus, lambda b: b["cls"].float() / 0 * 0, tmp_path / "y.npy",
                     meta_batch_size=4, num_workers=0, progress=False)


@pytest.mark.parametrize("spec, message", [
    ("refmodel", "expected pkg.module:factory"),
    ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
    ("refmodel:missing", "module 'refmodel' has no attribute 'missing'"),
    ("refmodel:not_a_scorer", "returned a int, expected an es_stream.Scorer"),
])
def test_bad_model_spec_is_named(setup, spec, message):
    corpus, tmp_path = setup
    result = cli(tmp_path, "score", "--corpus", str(tmp_path / "corpus.parquet"), "--model", spec,
                 "--out", str(tmp_path / "s.npy"))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.npy").exists()


def test_out_that_is_a_directory_is_refused_naming_it(setup):
    corpus, tmp_path = setup
    (tmp_path / "scores").mkdir()
    result = cli(tmp_path, *score_args(tmp_path, tmp_path / "scores"))
    assert result.returncode == 1, result.stderr
    assert f"--out {tmp_path / 'scores'} is a directory" in result.stderr
    assert "scores.npy" in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "scores").iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scoring_through_the_feedback_channel_matches_the_host(setup, tmp_path):
    corpus, _ = setup

    def score_fn(batch):
        assert batch["cls"].device.type == "cuda"
        return batch["cls"].float() * 2 + 1

    result = score_corpus(corpus, score_fn, tmp_path / "g.npy", meta_batch_size=4, num_workers=2,
                          device="cuda", progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"),
                                  (np.arange(N) % 10).astype(np.float32) * 2 + 1)
    assert result.scored == N


def test_the_progress_bar_follows_the_one_rule(setup, tmp_path, capfd):
    """progress=True draws no bar into a stderr that is not a terminal (a log, a pipe)."""
    corpus, _ = setup
    score_corpus(corpus, lambda b: b["cls"].float(), tmp_path / "bar.npy", meta_batch_size=8,
                 num_workers=0, progress=True)
    err = capfd.readouterr().err
    assert "scoring" not in err and "\r" not in err, err


def test_no_module_draws_a_bar_but_through_es_stream_progress():
    """Every progress bar goes through es_stream.progress (terminal only, --no-progress)."""
    root = Path(__file__).parent.parent
    offenders = [str(p.relative_to(root))
                 for folder in ("es_stream", "pipelines", "tools") for p in (root / folder).rglob("*.py")
                 if p.name != "progress.py" and any(
                     line.strip().startswith(("from tqdm", "import tqdm"))
                     for line in p.read_text(encoding="utf-8").splitlines())]
    assert not offenders, offenders
