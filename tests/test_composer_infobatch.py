"""InfoBatch with the real Composer Trainer on CPU, over real MDS shards (streaming.MDSWriter)
read by ESStreamingDataset with real DataLoader workers: every sample read is trained on and
scored with its training loss, the next epochs' manifests prune and up-weight, pruned samples are
never read, ``state.loss`` is the weighted mean with the manifest's weights (microbatched too),
and a resumed run writes bit-identical manifests.

Runs in .venv-composer (Composer pins torch 2.6-2.7.0); skipped elsewhere."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("streaming")

import pyarrow.parquet as pq  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.core import State  # noqa: E402
from composer.loggers import InMemoryLogger, Logger  # noqa: E402
from test_composer import (Crash, DictClassifier, copy_of, run_readme_block,  # noqa: E402
                           write_mds)

import es_stream as es  # noqa: E402
from es_stream.integrations.composer import EvolvedSampling  # noqa: E402
from es_stream.integrations.composer import InfoBatch  # noqa: E402
from es_stream.integrations.streaming_dataset import ESStreamingDataset  # noqa: E402

N, B = 256, 32
EPOCHS = 4


class Check(Callback):
    """Runs after the algorithm on each event. At AFTER_LOSS it reads the microbatch's ids (the
    batch keeps them: strip_ids=False), looks their weights up in the manifests itself and
    checks ``state.loss`` against the weighted mean of the recomputed per-sample losses. It
    records, per epoch, the ids and weights the algorithm applied, each id's loss, and the score
    store at the epoch's end."""

    def __init__(self, algorithm: InfoBatch, manifests: Path, corpus: es.Corpus) -> None:
        self.algorithm, self.manifests, self.corpus = algorithm, manifests, corpus
        self.ids: dict[int, list[int]] = {}
        self.weights: dict[int, dict[int, float]] = {}
        self.losses: dict[int, dict[int, float]] = {}
        self.scores: dict[int, np.ndarray] = {}
        self.microbatches: list[int] = []
        self._expected: dict[int, dict[int, float]] = {}

    def expected_weight(self, epoch: int, sample: int) -> float:
        if epoch not in self._expected:
            keep = es.manifest.read_epoch(self.manifests, epoch, self.corpus.fingerprint,
                                          self.corpus.shard_counts)
            self._expected[epoch] = {} if keep is None or keep.weights is None else dict(
                zip(keep.kept_ids.tolist(), keep.weights.tolist()))
        return self._expected[epoch].get(sample, 1.0)

    def after_loss(self, state: State, logger: Logger) -> None:
        epoch = int(state.timestamp.epoch)
        ids = state.batch["es_id"].tolist()
        w = torch.tensor([self.expected_weight(epoch, i) for i in ids])
        losses = F.cross_entropy(state.outputs, state.batch["y"], reduction="none").detach()
        torch.testing.assert_close(state.loss.detach(), (losses * w).mean(), rtol=1e-6, atol=0)
        seen = self.losses.setdefault(epoch, {})
        for i, loss in zip(ids, losses.tolist()):
            assert i not in seen, f"id {i} trained twice in epoch {epoch}"
            seen[i] = loss
        self.microbatches.append(len(ids))

    def batch_end(self, state: State, logger: Logger) -> None:
        epoch = int(state.timestamp.epoch)
        ids, weights = self.algorithm.last_ids.tolist(), self.algorithm.last_weights.tolist()
        self.ids.setdefault(epoch, []).extend(ids)
        self.weights.setdefault(epoch, {}).update(zip(ids, weights))

    def epoch_end(self, state: State, logger: Logger) -> None:
        self.scores[int(state.timestamp.epoch) - 1] = self.algorithm.store.to_numpy()


def make_trainer(data: Path, algorithm, manifests: Path | None, *, epochs: int = EPOCHS,
                 num_workers: int = 0, microbatch: int = B, callbacks=(), algorithms=(),
                 max_duration: str | None = None, **kwargs) -> Trainer:
    dataset = ESStreamingDataset(local=data, batch_size=B, shuffle=True, shuffle_seed=7,
                                 manifests=manifests)
    loader = torch.utils.data.DataLoader(dataset, batch_size=B, num_workers=num_workers)
    model = DictClassifier()
    return Trainer(model=model, train_dataloader=loader,
                   max_duration=max_duration or f"{epochs}ep",
                   optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                   algorithms=[algorithm, *algorithms], callbacks=list(callbacks), device="cpu",
                   seed=17, progress_bar=False, log_to_console=False,
                   device_train_microbatch_size=microbatch, **kwargs)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_mds(tmp_path / "mds")


@pytest.mark.parametrize("microbatch", [B, 8])
def test_infobatch_prunes_upweights_and_weights_the_loss(data: Path, tmp_path: Path,
                                                         microbatch: int, caplog):
    manifests = tmp_path / "manifests"
    corpus = es.Corpus.from_mds(data)
    algorithm = InfoBatch(ratio=0.5, anneal=0.25, strip_ids=False, seed=3)
    check = Check(algorithm, manifests, corpus)
    memory = InMemoryLogger()
    trainer = make_trainer(data, algorithm, manifests, num_workers=2, microbatch=microbatch,
                           callbacks=[check], loggers=[memory])
    with caplog.at_level(logging.WARNING, logger="es_stream.integrations.streaming_dataset"):
        trainer.fit()
    # the dataset was told the weights reach the loss: no "weights not delivered" warning
    assert not [r for r in caplog.records if "loss weights" in r.getMessage()]
    # the run record and epochs 1..3: none for epoch 4, which a 4-epoch run never trains
    assert sorted(p.name for p in manifests.iterdir()) == ["_run.json"] + [f"epoch={e:05d}" for e in (1, 2, 3)]
    keeps = {e: es.manifest.read_epoch(manifests, e, corpus.fingerprint, corpus.shard_counts)
             for e in range(EPOCHS)}
    assert keeps[0] is None and sorted(check.ids[0]) == list(range(N))  # epoch 0 trains all
    # anneal=0.25 of 4 epochs: epochs 1 and 2 are pruned, epoch 3 keeps everything
    for e in (1, 2):
        kept = keeps[e].kept_ids
        assert 0 < len(kept) < N and keeps[e].weights is not None
        # the epoch read exactly its kept ids, each once: every pruned id is absent
        assert sorted(check.ids[e]) == kept.tolist()
        # the weight applied to each sample is the manifest's (1/(1-r) = 2 for the kept
        # below-mean samples, 1 for the others)
        manifest_w = dict(zip(kept.tolist(), keeps[e].weights.tolist()))
        assert check.weights[e] == manifest_w
        assert set(manifest_w.values()) == {1.0, 2.0}
        # the up-weighted ones are those whose loss last epoch was below its mean
        prev = check.scores[e - 1]
        up = np.array([i for i, w in manifest_w.items() if w == 2.0])
        assert (prev[up] < prev.astype(np.float64).mean()).all()
    assert keeps[3].weights is None and len(keeps[3].kept_ids) == N
    assert sorted(check.ids[3]) == list(range(N)) and set(check.weights[3].values()) == {1.0}
    # microbatches: every step split into its rows, in order, and mapped to the right ids
    assert max(check.microbatches) == microbatch
    assert int(trainer.state.timestamp.sample) == sum(len(check.ids[e]) for e in range(EPOCHS))
    # per-epoch stats and the pruning summary reached Composer's loggers
    logged = {k: [v for _, v in values] for k, values in memory.data.items()}
    assert logged["es/samples_seen"] == [len(check.ids[e]) for e in range(EPOCHS)]
    assert logged["es/upweighted"] == [sum(w != 1 for w in check.weights[e].values())
                                       for e in range(EPOCHS)]
    for e in range(EPOCHS):
        np.testing.assert_allclose(logged["es/weight_mean"][e],
                                   np.mean(list(check.weights[e].values())), rtol=1e-6)
        np.testing.assert_allclose(logged["es/loss_mean"][e],
                                   np.mean(list(check.losses[e].values())), rtol=1e-5)
    assert logged["es/prune/epoch"] == [1.0, 2.0, 3.0]  # none for epoch 4: never trained
    assert logged["es/prune/kept"] == [len(keeps[e].kept_ids) for e in (1, 2, 3)]
    # read without InfoBatch, the same manifests warn that their weights are not delivered
    dataset = trainer.state.train_dataloader.dataset
    dataset.weights_delivered = False
    with caplog.at_level(logging.WARNING, logger="es_stream.integrations.streaming_dataset"):
        dataset.epoch_keep(1)
    assert any("InfoBatch" in r.getMessage() for r in caplog.records)
    trainer.close()


def test_scores_are_each_samples_training_loss(data: Path, tmp_path: Path):
    """After each epoch the store holds, for every sample trained in it, the loss it was trained
    with; pruned samples keep their older score."""
    manifests = tmp_path / "manifests"
    corpus = es.Corpus.from_mds(data)
    algorithm = InfoBatch(ratio=0.5, anneal=0.0, strip_ids=False)
    check = Check(algorithm, manifests, corpus)
    trainer = make_trainer(data, algorithm, manifests, epochs=2, microbatch=16, callbacks=[check])
    trainer.fit()
    trainer.close()
    first = check.losses[0]
    assert sorted(first) == list(range(N))  # every id scored, exactly once (Check asserts it)
    expected = np.array([first[i] for i in range(N)], np.float32)
    np.testing.assert_allclose(check.scores[0], expected, rtol=1e-6)
    second = check.losses[1]
    assert 0 < len(second) < N
    for i in range(N):
        np.testing.assert_allclose(check.scores[1][i], second.get(i, first[i]), rtol=1e-6)


def run_to_the_end(data: Path, manifests: Path, **kwargs) -> tuple[Trainer, InfoBatch]:
    algorithm = InfoBatch(ratio=0.5, anneal=0.25, seed=5)
    trainer = make_trainer(data, algorithm, manifests, loggers=[InMemoryLogger()], **kwargs)
    trainer.fit()
    return trainer, algorithm


@pytest.mark.parametrize("save_interval,crash_at", [
    ("1ep", 10),  # checkpoint at the end of epoch 0, die inside pruned epoch 1
    ("3ba", 11),  # checkpoint at batch 9, inside pruned epoch 1: no EPOCH_START on resume
])
def test_resume_writes_the_manifests_of_an_uninterrupted_run(data: Path, tmp_path: Path,
                                                              save_interval: str, crash_at: int):
    full, full_alg = run_to_the_end(copy_of(data, tmp_path, "a"), tmp_path / "man-a")
    full_params = [p.detach().clone() for p in full.state.model.parameters()]
    full_log = next(d for d in full.logger.destinations if isinstance(d, InMemoryLogger))
    full.close()

    data_b, manifests_b, checkpoints = copy_of(data, tmp_path, "b"), tmp_path / "man-b", tmp_path / "ckpt"
    first = make_trainer(data_b, InfoBatch(ratio=0.5, anneal=0.25, seed=5), manifests_b,
                         callbacks=[Crash(crash_at)], save_folder=str(checkpoints),
                         save_interval=save_interval, save_filename="ba{batch}.pt")
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.close()
    saved = sorted(checkpoints.glob("ba*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    assert saved
    resumed, resumed_alg = run_to_the_end(data_b, manifests_b, load_path=str(saved[-1]))
    assert int(resumed.state.timestamp.epoch) == EPOCHS
    a, b = tmp_path / "man-a", manifests_b
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.parquet"))
    assert names and names == sorted(str(p.relative_to(b)) for p in b.rglob("*.parquet"))
    for name in names:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    np.testing.assert_array_equal(resumed_alg.store.to_numpy(), full_alg.store.to_numpy())
    for p, q in zip(resumed.state.model.parameters(), full_params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    # the stats of the epoch the checkpoint cut are those of the uninterrupted run
    resumed_log = next(d for d in resumed.logger.destinations if isinstance(d, InMemoryLogger))
    for key in ("es/samples_seen", "es/upweighted", "es/weight_mean"):
        tail = [v for _, v in resumed_log.data[key]]
        assert tail == [v for _, v in full_log.data[key]][-len(tail):], key
    resumed.close()
    # a resume that would prune otherwise than the checkpointed run is refused, naming the key
    other = make_trainer(copy_of(data, tmp_path, "c"), InfoBatch(ratio=0.3, anneal=0.25, seed=5),
                         tmp_path / "man-c", load_path=str(saved[-1]))
    with pytest.raises(ValueError, match="InfoBatch: cannot resume: the checkpoint's pruner has ratio='0.5', this one ratio='0.3'"):
        other.fit()
    other.close()


def test_bad_arguments_name_themselves(data: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="ratio must be in \\[0, 1\\)"):
        InfoBatch(ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        InfoBatch(ratio=-0.1)
    with pytest.raises(TypeError, match="ratio must be a number"):
        InfoBatch(ratio="0.5")
    with pytest.raises(ValueError, match="anneal must be"):
        InfoBatch(anneal=1.5)
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        InfoBatch(loss_fn="cross_entropy")
    with pytest.raises(ValueError, match="keep_snapshots"):
        InfoBatch(keep_snapshots=0)
    with pytest.raises(ValueError, match="num_samples"):
        InfoBatch(num_samples=0)
    with pytest.raises(ValueError, match="cannot share a Trainer with EvolvedSampling"):
        make_trainer(data, InfoBatch(), tmp_path / "m", algorithms=[EvolvedSampling(batch_size=8)])
    with pytest.raises(ValueError, match="InfoBatch algorithm"):
        EvolvedSampling(batch_size=8, policy=es.InfoBatchPolicy())

    def fit_fails(algorithm, manifests, match, error=ValueError, **kwargs):
        trainer = make_trainer(copy_of(data, tmp_path, f"c{len(list(tmp_path.iterdir()))}"),
                               algorithm, manifests, epochs=1, **kwargs)
        with pytest.raises(error, match=match):
            trainer.fit()
        trainer.close()

    fit_fails(InfoBatch(), None, "needs a manifest directory: pass manifests=")
    fit_fails(InfoBatch(manifests=tmp_path / "elsewhere"), tmp_path / "m",
              "ESStreamingDataset\\(manifests=...\\)")
    fit_fails(InfoBatch(), tmp_path / "m", "epoch max_duration", max_duration="4ba")
    fit_fails(InfoBatch(loss_fn=lambda outputs, batch: outputs.sum()), tmp_path / "m",
              r"InfoBatch: the loss gave \(\) for a microbatch of 32 samples; it must give one "
              r"loss per sample")

    class MeanOnly(DictClassifier):
        def loss(self, outputs, batch):
            return F.cross_entropy(outputs, batch["y"])

    algorithm = InfoBatch()
    dataset = ESStreamingDataset(local=copy_of(data, tmp_path, "mean"), batch_size=B,
                                 manifests=tmp_path / "m2")
    model = MeanOnly()
    trainer = Trainer(model=model, train_dataloader=torch.utils.data.DataLoader(dataset, batch_size=B),
                      max_duration="1ep", optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[algorithm], device="cpu", progress_bar=False, log_to_console=False)
    with pytest.raises(TypeError, match="MeanOnly.loss does not take reduction='none'; pass loss_fn="):
        trainer.fit()
    trainer.close()


def test_readme_composer_infobatch_example_runs(tmp_path: Path, monkeypatch):
    scope = run_readme_block("composer-infobatch", tmp_path, monkeypatch)
    trainer, algorithm = scope["trainer"], scope["algorithm"]
    assert isinstance(algorithm, InfoBatch) and int(trainer.state.timestamp.epoch) == 4
    corpus = es.Corpus.from_mds(tmp_path / "mds")
    keep = es.manifest.read_epoch(tmp_path / "manifests", 1, corpus.fingerprint,
                                  corpus.shard_counts)
    assert keep is not None and len(keep.kept_ids) < 512 and keep.weights is not None
    assert (tmp_path / "checkpoints" / "latest-rank0.pt").exists()  # what the README resumes from
    assert algorithm.step == int(trainer.state.timestamp.batch)


def test_readme_mds_block_writes_what_the_infobatch_block_reads(tmp_path: Path, monkeypatch):
    run_readme_block("composer-mds", tmp_path, monkeypatch, data=False)
    written = es.Corpus.from_mds(tmp_path / "mds")
    assert written.num_samples == 512
    scope = run_readme_block("composer-infobatch", tmp_path, monkeypatch, data=False)
    assert int(scope["trainer"].state.timestamp.epoch) == 4
    assert scope["algorithm"].pruner.corpus.fingerprint == written.fingerprint


@pytest.mark.parametrize("split,match", [
    # a split that repeats the batch: the second microbatch does not fit after the first
    (lambda batch, size: [batch, batch], "must split the batch in order"),
    # a split that drops half of the batch: a sample never reaches AFTER_LOSS
    (lambda batch, size: [{k: v[:B // 2] for k, v in batch.items()}],
     "each sample must reach AFTER_LOSS once"),
])
def test_microbatches_that_do_not_cover_the_batch_are_refused(data: Path, tmp_path: Path,
                                                              split, match):
    from composer.core import DataSpec

    dataset = ESStreamingDataset(local=data, batch_size=B, manifests=tmp_path / "m")
    spec = DataSpec(torch.utils.data.DataLoader(dataset, batch_size=B), split_batch=split)
    model = DictClassifier()
    trainer = Trainer(model=model, train_dataloader=spec, max_duration="1ep",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[InfoBatch()], device="cpu", progress_bar=False,
                      log_to_console=False, device_train_microbatch_size=B // 2)
    with pytest.raises(RuntimeError, match=match):
        trainer.fit()
    trainer.close()
