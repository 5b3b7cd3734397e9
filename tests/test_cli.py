"""The es-stream command line, run as the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from es_stream import Corpus

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True)


def test_index_wds_directory_and_load_back(wds_dir, tmp_path):
    out = tmp_path / "corpus.parquet"
    result = run("index", str(wds_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr
    corpus = Corpus.load(out)
    assert f"indexed {corpus.num_samples} samples in 5 wds shards" in result.stdout
    assert corpus.fingerprint == Corpus.from_webdataset(str(wds_dir)).fingerprint


def test_index_mds_and_pipe_urls(wds_dir, mds_dir, tmp_path):
    assert run("index", str(mds_dir), "-o", str(tmp_path / "m.parquet")).returncode == 0
    assert Corpus.load(tmp_path / "m.parquet").format == "mds"
    urls = [f"pipe:cat {p}" for p in sorted(wds_dir.glob("*.tar"))]
    assert run("index", *urls, "-o", str(tmp_path / "p.parquet")).returncode == 0
    assert Corpus.load(tmp_path / "p.parquet").num_samples == 50


def test_index_error_names_the_file(tmp_path):
    result = run("index", str(tmp_path / "nope-{0..1}.tar"), "-o", str(tmp_path / "x.parquet"))
    assert result.returncode == 1
    assert "nope-0.tar" in result.stderr and "no such shard" in result.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_index_replaces_its_own_index_but_never_another_file(wds_dir, mds_dir, tmp_path):
    tmp_path = tmp_path / "outputs"   # the fixtures' shards live beside it
    tmp_path.mkdir()
    out = tmp_path / "corpus.parquet"
    assert run("index", str(mds_dir), "-o", str(out)).returncode == 0
    result = run("index", str(wds_dir), "-o", str(out))      # re-indexing: an index it wrote
    assert result.returncode == 0, result.stderr
    assert Corpus.load(out).format == "wds"
    import pyarrow as pa
    import pyarrow.parquet as pq
    others = {"notes.txt": b"precious notes\n",                      # not Parquet
              "table.parquet": None,                                # Parquet, not an index
              "empty.parquet": b""}
    for name, content in others.items():
        path = tmp_path / name
        if content is None:
            pq.write_table(pa.table({"x": [1, 2, 3]}), path)
        else:
            path.write_bytes(content)
        before = path.read_bytes()
        result = run("index", str(wds_dir), "-o", str(path))
        assert result.returncode == 1, (name, result.stdout)
        assert f"--output {path} exists and is not an index es-stream wrote" in result.stderr, name
        assert path.read_bytes() == before, name
    (tmp_path / "d").mkdir()
    result = run("index", str(wds_dir), "-o", str(tmp_path / "d"))
    assert result.returncode == 1 and "is a directory" in result.stderr
    assert list((tmp_path / "d").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "corpus.parquet", "d"])


def test_help():
    result = run("index", "--help")
    assert result.returncode == 0 and "Parquet" in result.stdout


# --- prune / inspect / compact ---------------------------------------------------------------

import tarfile  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from es_stream import ScoreStore  # noqa: E402
from conftest import payload  # noqa: E402


def indexed_with_scores(shards: Path, tmp_path: Path) -> tuple[Corpus, Path, Path]:
    """Index ``shards`` with the CLI and save a store of random scores beside it."""
    index = tmp_path / "corpus.parquet"
    assert run("index", str(shards), "-o", str(index)).returncode == 0
    corpus = Corpus.load(index)
    store = ScoreStore(corpus.num_samples)
    scores = np.random.default_rng(1).random(corpus.num_samples).astype(np.float32) + 0.01
    store.scatter(torch.arange(corpus.num_samples), torch.from_numpy(scores))
    store.save(tmp_path / "scores.npy")
    return corpus, index, tmp_path / "scores.npy"


def kept_ids(manifests: Path, epoch: int) -> np.ndarray:
    t = pads.dataset(str(manifests / f"epoch={epoch:05d}"), format="parquet").to_table()
    return np.sort(np.asarray(t.column("id"))[np.asarray(t.column("keep"))])


@pytest.mark.parametrize("policy", ["es", "infobatch"])
def test_prune_offline_then_inspect_with_plot(wds_dir, tmp_path, policy):
    corpus, index, scores = indexed_with_scores(wds_dir, tmp_path)
    out = tmp_path / "manifests"
    result = run("prune", "--scores", str(scores), "--corpus", str(index), "--policy", policy,
                 "--ratio", "0.4", "--out", str(out), "--epoch", "2")
    assert result.returncode == 0, result.stderr
    kept = kept_ids(out, 2)
    if policy == "es":
        assert len(kept) == int(np.ceil(0.6 * corpus.num_samples))
    else:  # InfoBatch drops 40% of the below-mean samples only
        # InfoBatch drops each below-mean sample with probability 0.4 and nothing above the mean
        s = ScoreStore.load(scores).to_numpy()
        dropped = np.setdiff1d(np.arange(corpus.num_samples), kept)
        assert len(dropped) > 0 and (s[dropped] < s.mean()).all()
    assert f"kept {len(kept)} of {corpus.num_samples}" in result.stdout
    assert (out / "epoch=00002" / "_SUCCESS").exists()

    result = run("inspect", str(out), "--plot", str(tmp_path / "m.png"))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["2"])
    assert row.split()[1:3] == [str(corpus.num_samples), str(len(kept))]
    assert "scores (epoch 2)" in result.stdout
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_plot_replaces_its_own_figure_but_never_another_file(wds_dir, tmp_path):
    _, index, scores = indexed_with_scores(wds_dir, tmp_path)
    out = tmp_path / "manifests"
    assert prune(index, scores, out).returncode == 0
    for name in ("m.png", "m.pdf", "m.svg", "m.jpg"):
        figure = tmp_path / name
        for attempt in range(2):      # written, then replaced: it is a figure es-stream wrote
            result = run("inspect", str(out), "--plot", str(figure))
            assert result.returncode == 0, (name, attempt, result.stderr)
        assert figure.stat().st_size > 0
    others = {"photo.png": b"\x89PNG\r\n\x1a\n someone else's image",
              "notes.txt.png": b"notes", "empty.pdf": b""}
    for name, content in others.items():
        (tmp_path / name).write_bytes(content)
        result = run("inspect", str(out), "--plot", str(tmp_path / name))
        assert result.returncode == 1, name
        assert f"--plot {tmp_path / name} exists and is not a figure es-stream wrote" in result.stderr
        assert (tmp_path / name).read_bytes() == content
    result = run("inspect", str(out), "--plot", str(tmp_path / "m.gif"))
    assert result.returncode == 1 and "not .gif" in result.stderr
    assert not (tmp_path / "m.gif").exists()
    result = run("inspect", str(out), "--plot", str(out))
    assert result.returncode == 1 and "is a directory" in result.stderr


def test_prune_refuses_a_store_of_another_corpus(wds_dir, tmp_path):
    _, index, _ = indexed_with_scores(wds_dir, tmp_path)
    ScoreStore(7).save(tmp_path / "small.npy")
    result = run("prune", "--scores", str(tmp_path / "small.npy"), "--corpus", str(index),
                 "--ratio", "0.5", "--out", str(tmp_path / "m"))
    assert result.returncode == 1 and "small.npy" in result.stderr
    result = run("prune", "--scores", str(tmp_path / "none.npy"), "--corpus", str(index),
                 "--ratio", "0.5", "--out", str(tmp_path / "m"))
    assert result.returncode == 1 and "none.npy" in result.stderr


def test_inspect_empty_directory_is_an_error(tmp_path):
    result = run("inspect", str(tmp_path))
    assert result.returncode == 1 and "no finished epoch" in result.stderr


def tar_members(directory: Path) -> list[tuple[str, bytes]]:
    """Every (member name, payload) of every tar in ``directory``, in shard order."""
    members = []
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tf:
            members += [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    return members


def test_compact_wds_keeps_exactly_the_kept_samples_byte_identical(wds_dir, tmp_path):
    corpus, index, scores = indexed_with_scores(wds_dir, tmp_path)
    assert run("prune", "--scores", str(scores), "--corpus", str(index), "--ratio", "0.5",
               "--out", str(tmp_path / "m")).returncode == 0
    kept = kept_ids(tmp_path / "m", 0)
    result = run("compact", "--corpus", str(index), "--manifest", str(tmp_path / "m" / "epoch=00000"),
                 "--out", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr  # no progress bar redraws when stderr is not a terminal
    new = Corpus.from_webdataset(str(tmp_path / "new"))
    assert new.num_samples == len(kept)
    old = dict(tar_members(wds_dir))
    got = tar_members(tmp_path / "new")
    assert [name for name, _ in got] == [f"sample{i:06d}.{s}" for i in kept for s in ("bin", "cls")]
    assert all(data == old[name] for name, data in got)
    assert [data for name, data in got if name.endswith(".bin")] == [payload(i) for i in kept]
    mapping = pq.read_table(tmp_path / "new" / "mapping.parquet")
    assert mapping.column("old_id").to_pylist() == kept.tolist()
    assert mapping.column("new_id").to_pylist() == list(range(len(kept)))


@pytest.mark.parametrize("source", ["mds", "wds"])
def test_compact_to_mds(source, wds_dir, mds_dir, tmp_path):
    from es_stream.sources import open_reader

    corpus, index, scores = indexed_with_scores(mds_dir if source == "mds" else wds_dir, tmp_path)
    assert run("prune", "--scores", str(scores), "--corpus", str(index), "--ratio", "0.3",
               "--out", str(tmp_path / "m")).returncode == 0
    kept = kept_ids(tmp_path / "m", 0)
    result = run("compact", "--corpus", str(index), "--manifest", str(tmp_path / "m" / "epoch=00000"),
                 "--out", str(tmp_path / "new"), "--format", "mds")
    assert result.returncode == 0, result.stderr
    new = Corpus.from_mds(str(tmp_path / "new"))
    assert new.num_samples == len(kept)
    reader = open_reader(new)
    try:
        shards, positions = new.locate(np.arange(new.num_samples))
        got = [reader.read(int(s), int(p), i) for i, (s, p) in enumerate(zip(shards, positions))]
    finally:
        reader.close()
    assert [s["bin"] for s in got] == [payload(i) for i in kept]
    if source == "mds":
        assert [s["idx"] for s in got] == kept.tolist()
    else:
        assert [s["__key__"] for s in got] == [f"sample{i:06d}" for i in kept]
    # labels stay ints, as webdataset decodes .cls (not b"3")
    assert [s["cls"] for s in got] == [i % 10 for i in kept]


def test_compact_mds_to_wds_is_refused(mds_dir, tmp_path):
    _, index, scores = indexed_with_scores(mds_dir, tmp_path)
    assert run("prune", "--scores", str(scores), "--corpus", str(index), "--ratio", "0.3",
               "--out", str(tmp_path / "m")).returncode == 0
    result = run("compact", "--corpus", str(index), "--manifest", str(tmp_path / "m" / "epoch=00000"),
                 "--out", str(tmp_path / "new"), "--format", "wds")
    assert result.returncode == 1 and "--format mds" in result.stderr


def test_compact_needs_an_epoch_directory(wds_dir, tmp_path):
    _, index, _ = indexed_with_scores(wds_dir, tmp_path)
    result = run("compact", "--corpus", str(index), "--manifest", str(tmp_path),
                 "--out", str(tmp_path / "new"))
    assert result.returncode == 1 and "epoch=EEEEE" in result.stderr


@pytest.mark.parametrize("command", ["inspect", "prune", "compact"])
def test_help_for_each_command(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: es-stream " + command in result.stdout


# --- prune: bad arguments, scores of another corpus, never-scored samples -------------------

from conftest import write_wds  # noqa: E402


def prune(index: Path, scores: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("prune", "--scores", str(scores), "--corpus", str(index), "--ratio", "0.5",
               "--out", str(out), *extra)


def indexed(shards: Path, tmp_path: Path) -> tuple[Corpus, Path]:
    """The corpus of ``shards`` and its index, written in this process (one CLI run less)."""
    corpus = Corpus.from_webdataset(str(shards))
    corpus.save(tmp_path / "corpus.parquet")
    return corpus, tmp_path / "corpus.parquet"


@pytest.mark.parametrize("flag,value", [("--epoch", "-1"), ("--seed", "-3")])
def test_prune_refuses_bad_numbers_naming_the_flag(tmp_path, flag, value):
    args = {"--scores": "s.npy", "--corpus": "c.parquet", "--out": str(tmp_path / "m"),
            "--ratio": "0.5", flag: value}
    result = run("prune", *[x for kv in args.items() for x in kv])
    assert result.returncode == 2 and f"argument {flag}: expected" in result.stderr
    assert not (tmp_path / "m").exists()


def test_prune_refuses_scores_of_another_corpus_of_the_same_size(wds_dir, tmp_path):
    corpus, index = indexed(wds_dir, tmp_path)
    write_wds(tmp_path / "other", sizes=(25, 25))  # 50 samples too, other shards
    other = Corpus.from_webdataset(str(tmp_path / "other"))
    assert other.num_samples == corpus.num_samples and other.fingerprint != corpus.fingerprint
    store = ScoreStore(other.num_samples, fingerprint=other.fingerprint)
    store.scatter(torch.arange(other.num_samples), torch.rand(other.num_samples) + 0.1)
    store.save(tmp_path / "other-scores.npy")
    result = prune(index, tmp_path / "other-scores.npy", tmp_path / "m")
    assert result.returncode == 1
    assert (f"other-scores.npy: scores of corpus {other.fingerprint}" in result.stderr
            and f"this corpus is {corpus.fingerprint}" in result.stderr)
    assert not (tmp_path / "m").exists()


def test_prune_refuses_a_file_that_is_not_a_score_store(wds_dir, tmp_path):
    _, index = indexed(wds_dir, tmp_path)
    result = prune(index, index, tmp_path / "m")  # the Parquet index given as --scores
    assert result.returncode == 1
    assert f"{index}: not a .npy score file" in result.stderr and "Traceback" not in result.stderr


def test_prune_out_that_is_a_file_is_refused_and_left_alone(wds_dir, tmp_path):
    _, index, scores = indexed_with_scores(wds_dir, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = prune(index, scores, tmp_path / "notes.txt")
    assert result.returncode == 1
    assert f"--out {tmp_path / 'notes.txt'} is a file" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_prune_refuses_nan_scores_naming_the_file_and_sample(wds_dir, tmp_path):
    _, index = indexed(wds_dir, tmp_path)
    scores = np.full(50, 0.5, np.float32)
    scores[21] = np.nan
    np.save(tmp_path / "mine.npy", scores)  # made with numpy: no metadata, a warning
    result = prune(index, tmp_path / "mine.npy", tmp_path / "m")
    assert result.returncode == 1
    assert "no mine.meta.json beside it" in result.stderr
    assert "mine.npy: 1 of 50 scores are NaN or infinite (the first: sample id 21" in result.stderr


def test_prune_keeps_never_scored_samples_and_says_how_many(wds_dir, tmp_path):
    _, index = indexed(wds_dir, tmp_path)
    store = ScoreStore(50)
    store.scatter(torch.arange(40), torch.rand(40) + 0.1)  # 40..49: never scored
    store.save(tmp_path / "scores.npy")
    result = prune(index, tmp_path / "scores.npy", tmp_path / "m", "--epoch", "3")
    assert result.returncode == 0, result.stderr
    kept = kept_ids(tmp_path / "m", 3)
    assert len(kept) == 25 and set(range(40, 50)) <= set(kept.tolist())
    assert "kept 25 of 50 samples (50.0%; 10 never scored, all kept" in result.stdout


def test_a_stale_index_is_one_line_naming_the_shard(wds_dir, tmp_path):
    index = tmp_path / "corpus.parquet"
    assert run("index", str(wds_dir), "-o", str(index)).returncode == 0
    shard = sorted(wds_dir.glob("*.tar"))[1]
    os.utime(shard, ns=(0, 0))  # same bytes, another mtime: the index no longer vouches for it
    result = run("compact", "--corpus", str(index), "--manifest", str(tmp_path / "m" / "epoch=00000"),
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{shard}: shard changed since it was indexed" in result.stderr


# --- conventions: --version, bare help, help on every flag, exit codes, --debug ---------------

import argparse  # noqa: E402

from es_stream import ESWPPolicy, Pruner, __version__  # noqa: E402
from es_stream.cli import build_parser, index_progress, PROGRESS_MIN_SHARDS  # noqa: E402


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"es-stream {__version__}"


def test_bare_command_prints_help_and_exits_0():
    # as pip does (git exits 1): asking with no command is asking what there is
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: es-stream")
    assert all(c in result.stdout for c in ("index", "inspect", "prune", "score", "compact",
                                            "dedup"))
    assert "exit status" in result.stdout


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_and_command_has_help():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) == 7  # es-stream and its six commands
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(a.help for a in action._choices_actions), parser.prog
            else:
                assert action.help and action.help != argparse.SUPPRESS, \
                    f"{parser.prog} {'/'.join(action.option_strings) or action.dest}: no help"


def test_usage_errors_exit_2_runtime_errors_exit_1_in_one_line(tmp_path):
    # usage: argparse's convention, 2, with the usage line
    for args in (["inspect"], ["inspect", str(tmp_path), "--epoch", "x"], ["nope"],
                 ["prune", "--scores", "s", "--corpus", "c", "--out", "o", "--policy", "band",
                  "--ratio", "0.5"]):
        result = run(*args)
        assert result.returncode == 2 and result.stderr.startswith("usage: es-stream"), args
    # runtime: 1, one line naming the input, no traceback
    missing = tmp_path / "no-such-manifests"
    result = run("inspect", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"es-stream inspect: error: {missing}: no such manifest directory\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    missing = str(tmp_path / "no-such-manifests")
    args = ["--debug", "inspect", missing] if where == "before" else ["inspect", missing, "--debug"]
    result = run(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert f"FileNotFoundError: {missing}: no such manifest directory" in result.stderr


def test_index_progress_only_on_a_terminal_over_many_or_streamed_shards():
    few, many = ["a.tar"] * 3, ["a.tar"] * PROGRESS_MIN_SHARDS
    assert index_progress(few, disabled=False, tty=True) is None
    assert index_progress(many, disabled=False, tty=True) is not None
    assert index_progress(["pipe:cat a.tar"], disabled=False, tty=True) is not None
    assert index_progress(many, disabled=False, tty=False) is None  # a log, a pipe
    assert index_progress(many, disabled=True, tty=True) is None  # --no-progress
    bar = index_progress(["pipe:cat a.tar", "b.tar"], disabled=False, tty=True)
    assert list(bar(["x", "y"])) == ["x", "y"]  # wraps the shards, yielding each once


def test_index_with_no_progress_writes_the_same_corpus(wds_dir, tmp_path):
    result = run("index", str(wds_dir), "-o", str(tmp_path / "c.parquet"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert Corpus.load(tmp_path / "c.parquet").fingerprint == \
        Corpus.from_webdataset(str(wds_dir)).fingerprint


# --- inspect: burn-in and annealing, --epoch, the plot -----------------------------------------

def training_manifests(wds_dir: Path, out: Path, epochs: int = 8) -> Corpus:
    """Manifests as a training run writes them: ESWP with 2 burn-in epochs and an annealing
    quarter, epochs 1..epochs-1 (epoch 0 has none: it keeps everything). Scores spread over
    four decades, as losses do."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    store = ScoreStore(corpus.num_samples)
    scores = 10 ** np.random.default_rng(0).uniform(-3, 1, corpus.num_samples)
    store.scatter(torch.arange(corpus.num_samples), torch.from_numpy(scores.astype(np.float32)))
    pruner = Pruner(corpus, store, ESWPPolicy(ratio=0.5, anneal=0.25, burn_in_epochs=2), out)
    for e in range(1, epochs):
        pruner.write(e, epochs)
    return corpus


def test_inspect_names_burn_in_and_annealing_and_plots_the_last_pruned_epoch(wds_dir, tmp_path):
    training_manifests(wds_dir, tmp_path / "m")
    result = run("inspect", str(tmp_path / "m"), "--plot", str(tmp_path / "m.png"))
    assert result.returncode == 0, result.stderr
    assert ("phases: pruning in 4 epoch(s), 2..5; burn-in epochs 0..1 (nothing pruned); "
            "annealing epochs 6..7 (nothing pruned)") in result.stdout
    # the default histogram: the last epoch that pruned, not the (annealing) last epoch
    assert "scores (epoch 5)" in result.stdout
    assert "(score histogram of epoch 5)" in result.stdout
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_epoch_chooses_the_histogram(wds_dir, tmp_path):
    training_manifests(wds_dir, tmp_path / "m", epochs=5)
    result = run("inspect", str(tmp_path / "m"), "--epoch", "2", "--plot", str(tmp_path / "e.png"))
    assert result.returncode == 0, result.stderr
    assert "scores (epoch 2)" in result.stdout and (tmp_path / "e.png").exists()
    result = run("inspect", str(tmp_path / "m"), "--epoch", "9", "--plot", str(tmp_path / "x.png"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--epoch 9: no finished manifest for that epoch; epochs with one: 1-4" in result.stderr
    assert not (tmp_path / "x.png").exists()


# --- the README's DuckDB query ---------------------------------------------------------------

def readme_duckdb_query() -> str:
    """The DuckDB query of the README's manifest section, as written there."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"```sql\n(.*?)```", text, re.S)
    assert match, "README: the DuckDB query (a sql block) is gone"
    return " ".join(line.strip() for line in match.group(1).splitlines())


def test_duckdb_query_returns_integer_epochs_in_order(wds_dir, tmp_path):
    corpus = training_manifests(wds_dir, tmp_path / "m", epochs=12)  # epochs 1..11: 10 > 9
    # the README's pyarrow reading types the hive partition itself
    assert str(pads.dataset(str(tmp_path / "m"), partitioning="hive").schema.field("epoch").type) \
        == "int32"
    duckdb = pytest.importorskip("duckdb")
    query = readme_duckdb_query().replace("'manifests/", f"'{tmp_path / 'm'}/")
    rows = duckdb.sql(query)
    assert rows.types == ["INTEGER", "DOUBLE"]
    got = rows.fetchall()
    assert [e for e, _ in got] == list(range(1, 12))
    for e, kept in got:
        assert kept == pytest.approx(kept_ids(tmp_path / "m", e).size / corpus.num_samples)


def test_inspect_of_a_decision_for_every_epoch_has_no_burn_in(wds_dir, tmp_path):
    _, index, scores = indexed_with_scores(wds_dir, tmp_path)
    assert run("prune", "--scores", str(scores), "--corpus", str(index), "--policy", "band",
               "--band", "middle", "--keep", "0.5", "--out", str(tmp_path / "m")).returncode == 0
    result = run("inspect", str(tmp_path / "m"), "--plot", str(tmp_path / "plots" / "b.svg"))
    assert result.returncode == 0, result.stderr
    assert "phases: one decision, written as epoch 0, for every epoch (applies_to: all)" \
        in result.stdout
    assert (tmp_path / "plots" / "b.svg").read_text().lstrip().startswith("<?xml")  # by extension
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["b.svg"]  # no temporary left


def test_index_shows_a_bar_on_a_terminal_over_many_shards(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    write_wds(tmp_path / "many", sizes=(1,) * PROGRESS_MIN_SHARDS)
    leader, follower = pty.openpty()  # stderr a terminal, as in an interactive shell
    # a new pty is 0 columns wide, which tqdm draws as an empty bar: make it 100
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([EXE, "index", str(tmp_path / "many"), "-o", str(tmp_path / "c.pq")],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)  # read while it runs: a closed terminal's unread output can be lost
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end, all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        proc.wait()
    assert proc.returncode == 0
    assert b"index: 100%" in seen, seen
    assert f"{PROGRESS_MIN_SHARDS}/{PROGRESS_MIN_SHARDS}".encode() in seen
    assert Corpus.load(tmp_path / "c.pq").num_shards == PROGRESS_MIN_SHARDS
