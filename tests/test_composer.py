"""EvolvedSampling with the real Composer Trainer on CPU, over real MDS shards (streaming.MDSWriter)
read by ESStreamingDataset: b samples reach the optimizer, the whole meta-batch is counted,
scores change, ESWP manifests are written and applied, and a run resumed from a mid-epoch (or
epoch-end) checkpoint selects exactly what an uninterrupted run selects.

Composer pins torch 2.6-2.7.0, so these tests run in the second environment `make test` builds
(.venv-composer); in the main environment they are skipped."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("streaming")

import torch.nn.functional as F  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.core import Algorithm, Event, State  # noqa: E402
from composer.loggers import InMemoryLogger, Logger  # noqa: E402
from composer.models import ComposerClassifier, ComposerModel  # noqa: E402

import es_stream as es  # noqa: E402
from es_stream.integrations.composer import EvolvedSampling, causal_lm_sample_loss  # noqa: E402
from es_stream.integrations.streaming_dataset import ESStreamingDataset  # noqa: E402

N, B, b = 256, 32, 8  # corpus, meta-batch, selected
README = Path(__file__).resolve().parents[1] / "README.md"


def write_mds(directory: Path, n: int = N, seed: int = 0) -> Path:
    """``n`` samples around 4 class centres: "x" float32[8], "y" int, in several MDS shards."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 8)).astype(np.float32) * 2
    with MDSWriter(out=str(directory), columns={"x": "ndarray:float32:8", "y": "int"},
                   size_limit=2000) as w:
        for i in range(n):
            w.write({"x": centers[i % 4] + rng.normal(size=8).astype(np.float32), "y": i % 4})
    return directory


class DictClassifier(ComposerModel):
    """A tiny classifier over dict batches, whose loss takes ``reduction`` like F.cross_entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, batch):
        return self.net(batch["x"])

    def loss(self, outputs, batch, reduction: str = "mean"):
        return F.cross_entropy(outputs, batch["y"], reduction=reduction)


class Record(Callback):
    """What reached the model: batch sizes at the forward and after the backward, the ids ES
    selected at each step, and the trainer's dataloader_len per epoch."""

    def __init__(self, algorithm: EvolvedSampling) -> None:
        self.algorithm = algorithm
        self.forward_sizes: list[int] = []
        self.backward_sizes: list[int] = []
        self.selected: dict[int, list[int]] = {}
        self.dataloader_len: dict[int, int] = {}

    def before_forward(self, state: State, logger: Logger) -> None:
        self.forward_sizes.append(len(state.batch["x"]))
        self.dataloader_len[int(state.timestamp.epoch)] = int(state.dataloader_len)

    def after_backward(self, state: State, logger: Logger) -> None:
        assert all(p.grad is not None for p in state.model.parameters())
        self.backward_sizes.append(len(state.batch["y"]))

    def batch_end(self, state: State, logger: Logger) -> None:
        self.selected[int(state.timestamp.batch)] = self.algorithm.last_ids.tolist()


class SizeProbe(Algorithm):
    """Another AFTER_DATALOADER algorithm: records the batch size it is given."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.sizes.append(len(state.batch["x"]))


class Crash(Callback):
    """Stops the process-like run at a batch, after the checkpoint before it was written."""

    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.at_batch:
            raise KeyboardInterrupt("simulated preemption")


def make_trainer(data: Path, algorithm: EvolvedSampling, *, epochs: int = 2,
                 manifests: Path | None = None, num_workers: int = 0, callbacks=(),
                 algorithms=(), **kwargs) -> tuple[Trainer, Record]:
    dataset = ESStreamingDataset(local=data, batch_size=B, shuffle=True, shuffle_seed=7,
                                 manifests=manifests)
    loader = torch.utils.data.DataLoader(dataset, batch_size=B, num_workers=num_workers)
    model = DictClassifier()
    record = Record(algorithm)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{epochs}ep",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[algorithm, *algorithms], callbacks=[record, *callbacks],
                      device="cpu", seed=17, progress_bar=False, log_to_console=False,
                      device_train_microbatch_size=b, **kwargs)
    return trainer, record


def copy_of(data: Path, tmp_path: Path, name: str) -> Path:
    # one live StreamingDataset per local directory (streaming registers it in shared memory)
    return Path(shutil.copytree(data, tmp_path / name))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_mds(tmp_path / "mds")


def test_es_two_epochs_backpropagates_b_samples_and_counts_the_meta_batch(data: Path):
    algorithm = EvolvedSampling(batch_size=b)
    probe = SizeProbe()
    trainer, record = make_trainer(data, algorithm, num_workers=2, algorithms=[probe])
    initial = 1 / N
    trainer.fit()
    steps = 2 * N // B
    assert record.forward_sizes == [b] * steps and record.backward_sizes == [b] * steps
    assert probe.sizes == [b] * steps  # listed after ES, yet it saw the selected batch: ES ran first
    assert int(trainer.state.timestamp.sample) == 2 * N  # every meta-batch counted whole
    assert int(trainer.state.timestamp.batch) == steps
    scores = algorithm.selector.store.to_numpy()
    assert (scores != np.float32(initial)).all()  # every sample was forwarded and scored
    for ids in record.selected.values():
        assert len(ids) == len(set(ids)) == b
    assert algorithm.selector.step == steps
    trainer.close()


def test_eswp_writes_manifests_and_the_next_epoch_trains_only_kept_samples(data: Path, tmp_path: Path):
    manifests = tmp_path / "manifests"
    policy = es.ESWPPolicy(ratio=0.5, burn_in_epochs=1, anneal=0.0, seed=3)
    algorithm = EvolvedSampling(keep=0.25, policy=policy)
    trainer, record = make_trainer(data, algorithm, epochs=3, manifests=manifests)
    trainer.fit()
    corpus = es.Corpus.from_mds(data)
    # the run record, and epochs 1 and 2: none for epoch 3, which a 3-epoch run never trains
    assert sorted(p.name for p in manifests.iterdir()) == ["_run.json", "epoch=00001", "epoch=00002"]
    kept = {e: es.manifest.read_epoch(manifests, e, corpus.fingerprint, corpus.shard_counts)
            for e in (1, 2)}
    # burn_in_epochs=1: epoch 0 trains on everything; the decisions for epochs 1 and 2 prune
    assert all(len(k.kept_ids) == N // 2 for k in kept.values())
    batches = N // B, (N // 2) // B, (N // 2) // B
    assert record.dataloader_len == {0: batches[0], 1: batches[1], 2: batches[2]}
    assert record.forward_sizes == [b] * sum(batches)
    assert int(trainer.state.timestamp.sample) == N + N // 2 + N // 2
    steps = sorted(record.selected)
    epoch1 = steps[batches[0]:batches[0] + batches[1]]
    trained = {i for s in epoch1 for i in record.selected[s]}
    assert trained <= set(kept[1].kept_ids.tolist())
    trainer.close()


def test_epoch_end_logs_selection_stats_and_pruning_summary(data: Path, tmp_path: Path):
    """Composer's loggers get, per epoch, the selector's stats as es/<key> and the pruning
    decision as es/prune/<key>: checked against what the run did and the manifests say."""
    manifests = tmp_path / "manifests"
    policy = es.ESWPPolicy(ratio=0.5, burn_in_epochs=1, anneal=0.0, seed=3)
    algorithm = EvolvedSampling(batch_size=b, policy=policy, burn_in=0.2)
    memory = InMemoryLogger()
    trainer, record = make_trainer(data, algorithm, epochs=3, manifests=manifests, loggers=[memory])
    trainer.fit()
    logged = {k: [v for _, v in values] for k, values in memory.data.items()}
    batches = [N // B, (N // 2) // B, (N // 2) // B]
    assert logged["es/steps"] == batches  # one entry per epoch: reset at each epoch end
    assert logged["es/samples_seen"] == [B * n for n in batches]
    assert logged["es/samples_selected"] == [b * n for n in batches]
    assert logged["es/selected_fraction"] == [b / B] * 3
    # burn_in=0.2 of 3 epochs: epoch 0 (elapsed 0) is uniform, the others are not
    assert logged["es/uniform_steps"] == [batches[0], 0, 0]
    # epoch 0 meets every sample for the first time; later epochs only scored ones
    assert logged["es/never_scored_fraction"] == [1.0, 0.0, 0.0]
    assert logged["es/weight_min"] == logged["es/weight_max"] == [1.0] * 3  # no reweighting
    for e in range(3):
        assert logged["es/score_p10"][e] <= logged["es/score_p50"][e] <= logged["es/score_p90"][e]
    corpus = es.Corpus.from_mds(data)
    assert logged["es/prune/epoch"] == [1.0, 2.0]  # none for epoch 3: a 3-epoch run never trains it
    for e in (1, 2):
        keep = es.manifest.read_epoch(manifests, e, corpus.fingerprint, corpus.shard_counts)
        assert logged["es/prune/kept"][e - 1] == len(keep.kept_ids)
    assert logged["es/prune/never_scored"] == [0.0] * 2
    # per-step keys are still there, one per step
    assert len(logged["es/selected"]) == sum(batches)
    trainer.close()


def resume_case(tmp_path: Path, data: Path, *, policy: bool, save_interval: str, crash_at: int,
                epochs: int):
    """Run once uninterrupted; run again, checkpointing at ``save_interval`` and dying at batch
    ``crash_at``; resume from the last checkpoint. Returns both runs' selections and states, and
    the uninterrupted run's InMemoryLogger."""

    def algorithm():
        p = es.ESWPPolicy(ratio=0.5, burn_in_epochs=1, anneal=0.0, seed=3) if policy else None
        return EvolvedSampling(batch_size=b, policy=p, burn_in=0.2, seed=5)

    full_alg = algorithm()
    full, full_rec = make_trainer(copy_of(data, tmp_path, "a"), full_alg, epochs=epochs,
                                  manifests=tmp_path / "man-a" if policy else None,
                                  loggers=[full_log := InMemoryLogger()])
    full.fit()
    full_params = [p.detach().clone() for p in full.state.model.parameters()]
    full.close()

    checkpoints = tmp_path / "ckpt"
    data_b = copy_of(data, tmp_path, "b")
    manifests_b = tmp_path / "man-b" if policy else None
    first, _ = make_trainer(data_b, algorithm(), epochs=epochs, manifests=manifests_b,
                            callbacks=[Crash(crash_at)], save_folder=str(checkpoints),
                            save_interval=save_interval, save_filename="ba{batch}.pt")
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.close()
    saved = sorted(checkpoints.glob("ba*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    resumed_alg = algorithm()
    resumed, resumed_rec = make_trainer(data_b, resumed_alg, epochs=epochs, manifests=manifests_b,
                                        load_path=str(saved[-1]), loggers=[InMemoryLogger()])
    start = int(resumed.state.timestamp.batch)
    resumed.fit()
    return full_alg, full_rec, full_params, resumed, resumed_alg, resumed_rec, start, full_log


@pytest.mark.parametrize("policy,save_interval,crash_at,expect_start", [
    (False, "5ba", 7, 5),     # ES, checkpoint mid-epoch 0 (8 meta-batches per epoch)
    (True, "10ba", 11, 10),   # ESWP, checkpoint mid-way through pruned epoch 1 (4 meta-batches)
    (True, "1ep", 10, 8),     # ESWP, checkpoint at the end of epoch 0
])
def test_resume_selects_what_an_uninterrupted_run_selects(tmp_path: Path, data: Path, policy: bool,
                                                          save_interval: str, crash_at: int,
                                                          expect_start: int):
    epochs = 3 if policy else 2
    full_alg, full_rec, full_params, resumed, resumed_alg, resumed_rec, start, full_log = resume_case(
        tmp_path, data, policy=policy, save_interval=save_interval, crash_at=crash_at,
        epochs=epochs)
    assert start == expect_start
    later = {s: ids for s, ids in full_rec.selected.items() if s > start}
    assert later and resumed_rec.selected == later
    assert int(resumed.state.timestamp.sample) == int(sum(
        len(v) for v in full_rec.selected.values()) / b * B)
    np.testing.assert_array_equal(resumed_alg.selector.store.to_numpy(),
                                  full_alg.selector.store.to_numpy())
    # the stats of the epoch the checkpoint cut (and later ones) are those of the uninterrupted
    # run: the steps before the checkpoint travelled in it
    resumed_log = next(d for d in resumed.logger.destinations if isinstance(d, InMemoryLogger))
    stat_keys = [k for k in full_log.data if k.startswith("es/") and k.count("/") == 1
                 and k not in ("es/meta_batch", "es/selected", "es/uniform")]
    assert "es/score_p50" in stat_keys
    for key in stat_keys:
        tail = [v for _, v in resumed_log.data[key]]
        assert tail == [v for _, v in full_log.data[key]][-len(tail):], key
    for p, q in zip(resumed.state.model.parameters(), full_params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    if policy:
        a, b_ = Path(str(tmp_path / "man-a")), Path(str(tmp_path / "man-b"))
        for name in sorted(p.relative_to(a) for p in a.rglob("*.parquet")):
            import pyarrow.parquet as pq

            assert pq.read_table(a / name).equals(pq.read_table(b_ / name)), name
    resumed.close()


def test_memory_mapped_store_checkpoints_a_snapshot_path(tmp_path: Path, data: Path):
    algorithm = EvolvedSampling(batch_size=b, store_path=tmp_path / "scores.npy", keep_snapshots=1)
    trainer, _ = make_trainer(data, algorithm, epochs=1, save_folder=str(tmp_path / "ckpt"),
                              save_interval="3ba", save_filename="ba{batch}.pt")
    trainer.fit()
    trainer.close()
    assert algorithm.selector.store.memory_mapped
    snapshots = sorted(tmp_path.glob("scores.npy.step-*.npy"))
    assert [p.name for p in snapshots] == ["scores.npy.step-000000000008.npy"]  # keep_snapshots=1
    state = torch.load(tmp_path / "ckpt" / "ba8.pt", weights_only=False)["state"]
    saved = dict(state["algorithms"])["EvolvedSampling"]
    assert "scores" not in saved and saved["scores_path"] == str(snapshots[0])
    np.testing.assert_array_equal(np.load(snapshots[0]), algorithm.selector.store.to_numpy())
    restored = EvolvedSampling(batch_size=b, store_path=tmp_path / "scores2.npy")
    trainer2, _ = make_trainer(copy_of(data, tmp_path, "again"), restored, epochs=1,
                               load_path=str(tmp_path / "ckpt" / "ba6.pt"))
    with pytest.raises(FileNotFoundError, match="keep_snapshots"):
        trainer2.fit()  # ba6's snapshot was removed (keep_snapshots=1)
    trainer2.close()


def test_tuple_batches_with_composer_classifier(tmp_path: Path, data: Path):
    """A (x, y, es_id) tuple batch: ids are the last field by default and are stripped, so
    ComposerClassifier (which unpacks (x, y)) trains on b rows."""
    dataset = ESStreamingDataset(local=data, batch_size=B, shuffle=True)

    def to_tuple(samples):
        batch = torch.utils.data.default_collate(samples)
        return batch["x"], batch["y"], batch["es_id"]

    loader = torch.utils.data.DataLoader(dataset, batch_size=B, collate_fn=to_tuple)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = ComposerClassifier(module, num_classes=4)
    sizes = []

    class Sizes(Callback):
        def before_forward(self, state, logger):
            assert len(state.batch) == 2
            sizes.append(len(state.batch[0]))

    algorithm = EvolvedSampling(keep=0.5)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ep",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[algorithm], callbacks=[Sizes()], device="cpu",
                      device_train_microbatch_size=B // 2, progress_bar=False, log_to_console=False)
    trainer.fit()
    trainer.close()
    assert sizes == [B // 2] * (N // B)
    assert int(trainer.state.timestamp.sample) == N


def test_errors_name_the_argument(tmp_path: Path, data: Path):
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        EvolvedSampling()
    with pytest.raises(ValueError, match="InfoBatch"):
        EvolvedSampling(batch_size=4, policy=es.InfoBatchPolicy())
    # pruning writes manifests the dataset must read
    trainer, _ = make_trainer(data, EvolvedSampling(batch_size=b, policy=es.ESWPPolicy(),
                                                    manifests=tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="ESStreamingDataset\\(manifests=...\\)"):
        trainer.fit()
    trainer.close()


def test_loss_shape_is_checked(tmp_path: Path, data: Path):
    algorithm = EvolvedSampling(batch_size=b, loss_fn=lambda outputs, batch: outputs.sum())
    trainer, _ = make_trainer(data, algorithm)
    with pytest.raises(ValueError, match=r"one loss per sample \(\[B\]\)"):
        trainer.fit()
    trainer.close()


class TinyLM(ComposerModel):
    """A causal LM whose loss, like a Hugging Face model's, is one mean over the batch's tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

    def forward(self, batch):
        return {"logits": self.head(self.embed(batch["input_ids"]))}

    def loss(self, outputs, batch):
        logits = outputs["logits"][:, :-1]
        return F.cross_entropy(logits.reshape(-1, 16), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)


def test_language_model_selects_by_mean_token_loss(tmp_path: Path):
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    with MDSWriter(out=str(tmp_path / "tokens"), columns={"input_ids": "ndarray:int64:12"},
                   size_limit=1500) as w:
        for _ in range(128):
            w.write({"input_ids": rng.integers(0, 16, 12)})

    def collate(samples):
        batch = torch.utils.data.default_collate(samples)
        labels = batch["input_ids"].clone()
        labels[:, :4] = -100  # a prompt the loss ignores
        return {**batch, "labels": labels}

    def fit(algorithm):
        dataset = ESStreamingDataset(local=tmp_path / "tokens", batch_size=32)
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=collate)
        model = TinyLM()
        trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ep",
                          optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                          algorithms=[algorithm], device="cpu", device_train_microbatch_size=8,
                          progress_bar=False, log_to_console=False)
        try:
            trainer.fit()
        finally:
            trainer.close()
        return trainer

    with pytest.raises(TypeError, match="causal_lm_sample_loss"):
        fit(EvolvedSampling(batch_size=8))  # its loss has no reduction='none'
    algorithm = EvolvedSampling(batch_size=8, loss_fn=causal_lm_sample_loss)
    trainer = fit(algorithm)
    assert algorithm.selector.step == 4 and int(trainer.state.timestamp.sample) == 128
    assert len(algorithm.last_ids) == 8


def test_causal_lm_sample_loss_is_the_mean_over_target_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, 2, -100, -100, -100]])
    got = causal_lm_sample_loss({"logits": logits}, {"labels": labels})
    first = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    second = F.cross_entropy(logits[1, :1], labels[1, 1:2])
    torch.testing.assert_close(got, torch.stack([first, second]))


def run_readme_block(name: str, tmp_path: Path, monkeypatch, data: bool = True) -> dict:
    """Run the README's ``<!-- readme-test: NAME -->`` Composer block in ``tmp_path`` over a
    512-sample MDS corpus at ``mds/`` (written here unless ``data=False``: the README's own
    block wrote it); returns the names it defined."""
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {re.escape(name)} .*?-->\n```python\n(.*?)```", text, re.S)
    assert match, f"README block {name!r} not found"
    if data:
        write_mds(tmp_path / "mds", n=512, seed=1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    return scope


def test_readme_composer_example_runs(tmp_path: Path, monkeypatch):
    scope = run_readme_block("composer", tmp_path, monkeypatch)
    trainer, algorithm = scope["trainer"], scope["algorithm"]
    assert (tmp_path / "manifests" / "epoch=00002" / "_SUCCESS").exists()
    assert (tmp_path / "checkpoints" / "latest-rank0.pt").exists()  # what the README resumes from
    assert int(trainer.state.timestamp.epoch) == 4
    assert algorithm.selector.step == int(trainer.state.timestamp.batch)


@pytest.mark.parametrize("rule", ["topk", "es"])
def test_reference_store_selects_by_reducible_loss(tmp_path: Path, data: Path, rule: str):
    """RHO-LOSS in Composer: samples of class 0 get a huge reference loss, so their reducible
    loss is very negative: top-k never picks them, and the ES scores hold loss - reference."""
    n = N
    corpus = ESStreamingDataset(local=copy_of(data, tmp_path, "probe"), batch_size=B).corpus
    reference = es.ScoreStore(n, fingerprint=corpus.fingerprint)
    ref = np.where(np.arange(n) % 4 == 0, 100.0, 0.0).astype(np.float32)
    reference.write_range(0, ref)
    reference.set_reference({"scorer": "test", "complete": True})
    reference.save(tmp_path / "ref.npy")
    algorithm = EvolvedSampling(batch_size=b, reference_store=tmp_path / "ref.npy",
                                reference_rule=rule)
    trainer, record = make_trainer(data, algorithm, epochs=1)
    trainer.fit()
    picked = [i for ids in record.selected.values() for i in ids]
    assert len(picked) == (N // B) * b
    if rule == "topk":
        assert all(i % 4 != 0 for i in picked)
    scores = algorithm.selector.store.to_numpy()
    assert (scores[::4] < -10).all() and (scores[1::4] > -10).all()  # EMAs of loss - reference
    trainer.close()


def test_reference_store_of_another_corpus_is_refused(tmp_path: Path, data: Path):
    reference = es.ScoreStore(N, fingerprint="0123456789abcdef")
    reference.write_range(0, np.ones(N, np.float32))
    reference.save(tmp_path / "ref.npy")
    algorithm = EvolvedSampling(batch_size=b, reference_store=tmp_path / "ref.npy")
    with pytest.raises(es.ScoreError, match="scores of corpus 0123456789abcdef"):
        make_trainer(data, algorithm, epochs=1)[0].fit()
    with pytest.raises(ValueError, match="reference_rule must be"):
        EvolvedSampling(batch_size=b, reference_store=tmp_path / "ref.npy", reference_rule="rho")
