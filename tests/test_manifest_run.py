"""Manifests carry the run that wrote them; pruning schedules say when they prune nothing; no
manifest for an epoch past the run."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from es_stream import Corpus, ESDataset, ESWPPolicy, InfoBatchPolicy, ManifestError, Pruner, ScoreStore
from es_stream.manifest_run import RUN, read_run, run_id
from es_stream.schedule import pruned_epochs, schedule_warning, why_kept_all


def scored_store(corpus: Corpus, seed: int = 0) -> ScoreStore:
    store = ScoreStore(corpus.num_samples)
    rng = np.random.default_rng(seed)
    store.scatter(torch.arange(corpus.num_samples),
                  torch.from_numpy(rng.random(corpus.num_samples).astype(np.float32)))
    return store


def snapshot(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


# ---------------------------------------------------------------- one run per directory
def test_another_policy_into_the_same_directory_is_refused_naming_it(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    first = Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0), out)
    first.on_epoch_end(0, 4)
    record = read_run(out)
    assert record["run_id"] == first.run["run_id"] == run_id(out)
    assert record["settings"]["policy"] == "infobatch"
    meta = pq.read_schema(out / "epoch=00001" / "shard=00000.parquet").metadata
    assert meta[b"run_id"].decode() == record["run_id"]
    before = snapshot(out)
    with pytest.raises(ManifestError) as err:  # refused at construction, before any training
        Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0), out)
    message = str(err.value)
    assert str(out) in message and "another run" in message
    assert "policy='infobatch' there, 'es' here" in message and "overwrite=True" in message
    assert snapshot(out) == before  # nothing touched
    # the reader still gets the first run's decision
    assert ESDataset(corpus, 4, manifests=out).epoch_keep(1).weights is not None


def test_the_same_run_resumes_in_its_directory(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    policy = dict(ratio=0.5, burn_in_epochs=0, anneal=0.0)
    Pruner(corpus, scored_store(corpus, 1), ESWPPolicy(**policy), out).on_epoch_end(0, 4)
    # a resumed run: a new Pruner with the same settings (and later scores) goes on writing
    again = Pruner(corpus, scored_store(corpus, 2), ESWPPolicy(**policy), out)
    again.on_epoch_end(1, 4)
    assert sorted(os.listdir(out)) == [RUN, "epoch=00001", "epoch=00002"]
    for epoch in (1, 2):
        assert ESDataset(corpus, 4, manifests=out).epoch_keep(epoch).kept_fraction == 0.5


def test_overwrite_replaces_the_other_runs_epochs(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    old = Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0), out)
    old.on_epoch_end(0, 4)
    old.on_epoch_end(2, 4)  # epochs 1 and 3
    new = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0),
                 out, overwrite=True)
    assert read_run(out)["run_id"] == old.run["run_id"]  # construction deletes nothing
    new.on_epoch_end(0, 4)
    # epoch 3 was the other run's: gone, not left to be read in this run's epoch 3
    assert sorted(os.listdir(out)) == [RUN, "epoch=00001"]
    assert read_run(out)["run_id"] == new.run["run_id"] != old.run["run_id"]
    keep = ESDataset(corpus, 4, manifests=out).epoch_keep(1)
    assert keep.weights is None and len(keep.kept_ids) == int(np.ceil(0.7 * corpus.num_samples))


def test_overwrite_never_deletes_a_file_es_stream_did_not_write(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0), out).on_epoch_end(0, 4)
    notes = out / "epoch=00001" / "notes.txt"
    notes.write_text("mine")
    before = snapshot(out)
    new = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0),
                 out, overwrite=True)
    with pytest.raises(ManifestError, match=r"notes.txt: not a file es-stream writes"):
        new.on_epoch_end(0, 4)
    assert snapshot(out) == before


def test_manifests_without_a_run_record_are_compared_by_their_metadata(wds_dir, tmp_path):
    """Manifests of an es-stream that wrote no run record: their files' metadata still names
    the policy, so another policy is refused and the same one adopts the directory."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0), out).on_epoch_end(0, 4)
    os.unlink(out / RUN)
    with pytest.raises(ManifestError, match="earlier es-stream.*policy='infobatch' there, 'es' here"):
        Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0), out)
    with pytest.raises(ManifestError, match="ratio='0.5' there, '0.25' here"):
        Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.25, anneal=0.0), out)
    same = Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5, anneal=0.0), out)
    same.on_epoch_end(1, 4)
    assert read_run(out)["run_id"] == same.run["run_id"]


def test_a_damaged_run_record_is_named(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    out.mkdir()
    (out / RUN).write_text("{not json")
    with pytest.raises(ManifestError, match=rf"{RUN}: not an es-stream run record"):
        Pruner(corpus, scored_store(corpus), InfoBatchPolicy(), out)
    (out / RUN).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ManifestError, match=rf"{RUN}: not an es-stream run record"):
        Pruner(corpus, scored_store(corpus), InfoBatchPolicy(), out)


# ---------------------------------------------------------------- no manifest past the run
def test_no_manifest_for_an_epoch_past_the_run(wds_dir, tmp_path, caplog):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "m"
    epochs = 3
    pruner = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0), out)
    with caplog.at_level(logging.INFO, logger="es_stream.pruner"):
        written = [pruner.on_epoch_end(e, epochs) for e in range(epochs)]
    assert written[:2] == [str(out / "epoch=00001"), str(out / "epoch=00002")]
    assert written[2] is None
    assert sorted(n for n in os.listdir(out) if n.startswith("epoch=")) == ["epoch=00001", "epoch=00002"]
    assert pruner.last_summary["epoch"] == 2
    assert "no manifest is written for epoch 3" in caplog.text


# ---------------------------------------------------------------- schedules that prune nothing
def test_pruned_epochs_follow_the_schedule():
    # InfoBatch, anneal 0.125: 8 epochs -> the last one anneals; epoch 0 has no decision yet
    assert pruned_epochs(InfoBatchPolicy(ratio=0.5), 8) == [1, 2, 3, 4, 5, 6]
    assert pruned_epochs(InfoBatchPolicy(ratio=0.5), 2) == []
    assert pruned_epochs(InfoBatchPolicy(ratio=0.5, anneal=0.0), 2) == [1]
    assert pruned_epochs(ESWPPolicy(ratio=0.3, burn_in_epochs=3, anneal=0.25), 8) == [3, 4, 5]
    assert pruned_epochs(ESWPPolicy(ratio=0.0, anneal=0.0), 8) == []
    from es_stream.reference_policy import BandPolicy

    assert pruned_epochs(BandPolicy(keep=0.5), 3) == [0, 1, 2]  # decided before training
    assert schedule_warning(InfoBatchPolicy(ratio=0.5, anneal=0.0), 2) is None
    assert why_kept_all(InfoBatchPolicy(ratio=0.5), 1, 2).startswith("epoch 1 is in the annealing tail")
    assert "burn-in" in why_kept_all(ESWPPolicy(burn_in_epochs=2), 1, 8)
    assert "no decision" in why_kept_all(InfoBatchPolicy(), 0, 8)
    with pytest.raises(ValueError, match="total_epochs"):
        pruned_epochs(InfoBatchPolicy(), -1)


def test_a_schedule_that_prunes_nothing_warns_at_construction_and_each_epoch_end(wds_dir, tmp_path,
                                                                              caplog):
    """InfoBatch(ratio=0.5) over 2 epochs: epoch 0 has no decision, epoch 1 is the annealing
    tail; the run must say so instead of logging kept == samples without a word."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    policy = InfoBatchPolicy(ratio=0.5)
    with pytest.warns(UserWarning, match=r"InfoBatchPolicy\(ratio=0.5, anneal=0.125.*prunes no "
                                         r"epoch of this 2-epoch run.*annealing tail"):
        pruner = Pruner(corpus, scored_store(corpus), policy, tmp_path / "m", epochs=2)
    with caplog.at_level(logging.INFO, logger="es_stream.pruner"):
        pruner.on_epoch_end(0, 2)
    assert pruner.last_summary["pruned"] == 0
    assert "prunes no epoch of this 2-epoch run" in caplog.text  # in the log too
    assert "nothing pruned: epoch 1 is in the annealing tail" in caplog.text
    # without epochs= the first epoch end warns
    late = Pruner(corpus, scored_store(corpus), policy, tmp_path / "m2")
    with pytest.warns(UserWarning, match="prunes no epoch"):
        late.on_epoch_end(0, 2)


def test_a_schedule_that_prunes_does_not_warn(wds_dir, tmp_path, recwarn):
    corpus = Corpus.from_webdataset(str(wds_dir))
    pruner = Pruner(corpus, scored_store(corpus), InfoBatchPolicy(ratio=0.5), tmp_path / "m", epochs=8)
    pruner.on_epoch_end(0, 8)
    assert pruner.last_summary["pruned"] > 0
    assert not [w for w in recwarn if "prunes no epoch" in str(w.message)]
