"""Full and read-only file systems, damaged manifests, progress bars off a terminal, optional
extras: every failure names its file and says what to do; no lock outlives a failed write.

Full and read-only disks are real: a 64 KiB tmpfs, remounted read-only, when the tests run as
root (mounting needs it); skipped with that reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from es_stream import Corpus, ESWPPolicy, InfoBatchPolicy, ManifestError, Pruner, ScoreStore
from es_stream.errors import MissingExtraError

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=240,
                          env=None if env is None else dict(os.environ, **env))


def scored_store(corpus: Corpus, seed: int = 0) -> ScoreStore:
    store = ScoreStore(corpus.num_samples)
    rng = np.random.default_rng(seed)
    store.scatter(torch.arange(corpus.num_samples),
                  torch.from_numpy(rng.random(corpus.num_samples).astype(np.float32) + 0.01))
    return store


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "64k"):
    """A real, small tmpfs at ``directory`` for the block (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full or read-only disk) needs root")
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def remount_read_only(directory: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)


# ---------------------------------------------------------------- full disks
def test_a_failed_lock_write_releases_the_lock(wds_dir, tmp_path):
    """On a full disk the writer's pid cannot be written into its lock file: the write fails,
    naming the lock file, and the same process can write the epoch once there is room (the lock
    used to stay held by the failed call, refusing this process as "another writer")."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    with tmpfs(tmp_path / "disk") as disk:
        pruner = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
                        disk / "m")
        (disk / "m").mkdir()
        pruner.write(1, 4)  # the run record and a first epoch fit
        filler = fill(disk)
        with pytest.raises(OSError) as err:
            pruner.write(2, 4)
        assert err.value.errno == 28 and ".writer.lock" in str(err.value), err.value
        filler.unlink()
        pruner.write(2, 4)  # refused as "another writer" while the lock leaked
        assert (disk / "m" / "epoch=00002" / "_SUCCESS").exists()


def test_a_full_disk_names_the_manifest_file(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    with tmpfs(tmp_path / "disk") as disk:
        pruner = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
                        disk / "m")
        pruner.write(1, 4)
        # room for the lock file only: the first shard file's write fails
        filler = fill(disk)
        filler.unlink()
        with open(filler, "wb") as f:
            f.write(b"\0" * (os.statvfs(disk).f_bavail - 1) * os.statvfs(disk).f_frsize)
        with pytest.raises(OSError) as err:
            pruner.write(2, 4)
        assert err.value.errno == 28, err.value
        assert "epoch=00002" in str(err.value), err.value  # names the file, not just the errno
        assert not (disk / "m" / "epoch=00002" / "_SUCCESS").exists()
        assert not (disk / "m" / "epoch=00002" / ".writer.lock").exists()  # released


def test_prune_on_a_full_disk_names_the_path(wds_dir, tmp_path):
    corpus, index, scores = indexed_with_scores(wds_dir, tmp_path)
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk)
        result = run("prune", "--scores", str(scores), "--corpus", str(index), "--ratio", "0.5",
                     "--out", str(disk / "m"))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "No space left on device" in result.stderr and str(disk / "m") in result.stderr


# ---------------------------------------------------------------- read-only disks
def indexed_with_scores(wds_dir: Path, tmp_path: Path) -> tuple[Corpus, Path, Path]:
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    store = scored_store(corpus)
    store.bind(corpus.fingerprint)
    store.save(tmp_path / "scores.npy")
    return corpus, tmp_path / "corpus.parquet", tmp_path / "scores.npy"


def test_prune_reads_scores_from_a_read_only_mount(wds_dir, tmp_path):
    corpus, index, scores = indexed_with_scores(wds_dir, tmp_path)
    with tmpfs(tmp_path / "ro", size="1m") as ro:
        shutil.copy(scores, ro / "scores.npy")
        shutil.copy(str(scores).replace(".npy", ".meta.json"), ro / "scores.meta.json")
        remount_read_only(ro)
        result = run("prune", "--scores", str(ro / "scores.npy"), "--corpus", str(index),
                     "--ratio", "0.5", "--out", str(tmp_path / "m"))
        assert result.returncode == 0, result.stderr
    # the same decision as from a writable copy
    again = run("prune", "--scores", str(scores), "--corpus", str(index), "--ratio", "0.5",
                "--out", str(tmp_path / "m2"))
    assert again.returncode == 0, again.stderr
    for f in sorted((tmp_path / "m" / "epoch=00000").glob("*.parquet")):
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "m2" / "epoch=00000" / f.name))


def test_manifests_on_a_read_only_mount_name_the_path(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    with tmpfs(tmp_path / "ro") as ro:
        remount_read_only(ro)
        pruner = Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0), ro / "m")
        with pytest.raises(OSError) as err:
            pruner.on_epoch_end(0, 4)
        assert str(ro / "m") in str(err.value), err.value


# ---------------------------------------------------------------- damaged manifests
def test_inspect_names_a_manifest_whose_keep_is_strings(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0),
           tmp_path / "m").on_epoch_end(0, 4)
    path = tmp_path / "m" / "epoch=00001" / "shard=00003.parquet"
    table = pq.read_table(path)
    keep = pa.array(["true" if k else "false" for k in table.column("keep").to_pylist()])
    pq.write_table(table.set_column(table.schema.get_field_index("keep"), "keep", keep)
                   .replace_schema_metadata(table.schema.metadata), path)
    result = run("inspect", str(tmp_path / "m"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "shard=00003.parquet: column 'keep' is string, expected bool" in result.stderr


# ---------------------------------------------------------------- labels, overwrite
def test_inspect_does_not_call_infobatchs_first_epoch_burn_in(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    pruner = Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.25), tmp_path / "m")
    for e in range(3):
        pruner.on_epoch_end(e, 4)  # epochs 1, 2 pruned; 3 anneals
    result = run("inspect", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "burn-in" not in result.stdout
    assert ("phases: pruning in 2 epoch(s), 1..2; epochs 0..0 before the first decision "
            "(nothing pruned") in result.stdout
    assert "annealing epochs 3..3 (nothing pruned)" in result.stdout


def test_prune_refuses_another_policy_in_the_same_directory_unless_overwrite(wds_dir, tmp_path):
    _, index, scores = indexed_with_scores(wds_dir, tmp_path)
    out = tmp_path / "m"
    first = run("prune", "--scores", str(scores), "--corpus", str(index), "--policy", "infobatch",
                "--ratio", "0.5", "--out", str(out))
    assert first.returncode == 0, first.stderr
    again = run("prune", "--scores", str(scores), "--corpus", str(index), "--policy", "infobatch",
                "--ratio", "0.5", "--epoch", "1", "--out", str(out))
    assert again.returncode == 0, again.stderr  # the same run, its next epoch
    other = run("prune", "--scores", str(scores), "--corpus", str(index), "--policy", "es",
                "--ratio", "0.5", "--out", str(out))
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert f"{out}: holds the manifests of another run" in other.stderr
    assert "policy='infobatch' there, 'es' here" in other.stderr and "--overwrite" in other.stderr
    replaced = run("prune", "--scores", str(scores), "--corpus", str(index), "--policy", "es",
                   "--ratio", "0.5", "--out", str(out), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["_run.json", "epoch=00000"]


# ---------------------------------------------------------------- progress bars
REFMODEL = '''
import torch
from es_stream import Scorer
def factory():
    return Scorer(score_fn=lambda batch: batch["cls"].float() + 1.0)
'''


def test_score_draws_no_bar_into_a_log(wds_dir, tmp_path):
    """stderr a file or a pipe (a log, CI): no progress bar, without --no-progress."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    (tmp_path / "refmodel_faults.py").write_text(REFMODEL)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = run("score", "--corpus", str(tmp_path / "corpus.parquet"), "--model",
                 "refmodel_faults:factory", "--out", str(tmp_path / "s.npy"), "--meta-batch-size",
                 "4", "--workers", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "sample/s" not in result.stderr, result.stderr


def test_every_command_with_a_bar_takes_no_progress():
    from es_stream.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("index", "score", "compact"):
        assert "--no-progress" in sub.choices[name].format_help(), name


def test_progress_is_drawn_only_on_a_terminal(tmp_path):
    import io

    from es_stream.progress import progress, show_progress

    stream = io.StringIO()
    assert list(progress(range(5), file=stream)) == list(range(5))
    assert stream.getvalue() == ""  # not a terminal
    assert not show_progress(stream=stream) and not show_progress(True)
    import pty

    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert show_progress(stream=tty) and not show_progress(True, tty)
    finally:
        os.close(leader)
        os.close(follower)


# ---------------------------------------------------------------- extras
def test_the_readme_tools_have_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["plot"])
    assert any(dep.startswith("duckdb") for dep in extras["query"])


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    from es_stream.plot import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it raises
    with pytest.raises(MissingExtraError, match=r"matplotlib.*pip install 'es-stream\[plot\]'"):
        pyplot()


def test_every_atomic_write_on_a_full_disk_names_its_file(wds_dir, tmp_path):
    """The index, a score store's metadata, a checkpoint: each file es-stream writes for other
    runs goes through one atomic writer, and a full disk there names the file."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk)
        for target, write in [(disk / "corpus.parquet", lambda p: corpus.save(p)),
                              (disk / "scores.npy", lambda p: scored_store(corpus).save(p))]:
            with pytest.raises(OSError) as err:
                write(target)
            assert err.value.errno == 28, err.value
            assert target.name in str(err.value), err.value
            assert not target.exists()


def test_compact_on_a_full_disk_names_its_output_and_leaves_nothing(wds_dir, tmp_path):
    import numpy as np

    from es_stream.compact import compact

    corpus = Corpus.from_webdataset(str(wds_dir))
    with tmpfs(tmp_path / "disk", size="16k") as disk:
        with pytest.raises(OSError) as err:
            compact(corpus, np.arange(corpus.num_samples), disk / "out", "wds")
        assert err.value.errno == 28, err.value
        assert "out" in str(err.value), err.value
        assert sorted(p.name for p in disk.iterdir()) == []  # its temporary directory removed
