"""A WebDataset corpus feeds Composer through one command: tar shards written with
webdataset.ShardWriter ({"npy": float32[8], "cls": int}) are indexed and converted with
``es-stream compact --all --format mds`` (typed columns: labels stay ints), then trained in a
real Composer Trainer on ESStreamingDataset with the InfoBatch algorithm for 3 epochs, which
prunes epochs 1 and 2. Runs in .venv-composer; skipped elsewhere."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("streaming")

import torch.nn.functional as F  # noqa: E402
import webdataset as wds  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.core import State  # noqa: E402
from composer.loggers import InMemoryLogger, Logger  # noqa: E402
from composer.models import ComposerModel  # noqa: E402

from es_stream.integrations.composer import InfoBatch  # noqa: E402
from es_stream.integrations.streaming_dataset import ESStreamingDataset  # noqa: E402

N, B, EPOCHS = 240, 24, 3
EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))


def write_tar_corpus(directory: Path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)).astype(np.float32) * 2
    directory.mkdir(parents=True)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=50, verbose=0) as w:
        for i in range(N):
            buf = io.BytesIO()
            np.save(buf, centers[i % 4] + rng.normal(size=8).astype(np.float32))
            w.write({"__key__": f"{i:06d}", "npy": buf.getvalue(), "cls": i % 4})


class Classifier(ComposerModel):
    """Reads the converted columns as they are named by their tar suffixes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, batch):
        return self.net(batch["npy"])

    def loss(self, outputs, batch, reduction: str = "mean"):
        return F.cross_entropy(outputs, batch["cls"], reduction=reduction)


class Seen(Callback):
    """The label dtype and the samples trained per epoch (ids kept in the batch)."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.per_epoch: dict[int, int] = {}

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.dtypes.add(state.batch["cls"].dtype)
        epoch = int(state.timestamp.epoch)
        self.per_epoch[epoch] = self.per_epoch.get(epoch, 0) + len(state.batch["cls"])


def test_a_webdataset_corpus_trains_in_composer_after_one_conversion(tmp_path: Path):
    write_tar_corpus(tmp_path / "tar")
    index = tmp_path / "corpus.parquet"
    for args in (["index", str(tmp_path / "tar"), "-o", str(index)],
                 ["compact", "--corpus", str(index), "--all", "--format", "mds",
                  "--out", str(tmp_path / "mds"), "--no-progress"]):
        result = subprocess.run([EXE, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    dataset = ESStreamingDataset(local=tmp_path / "mds", batch_size=B, shuffle=True,
                                 shuffle_seed=3, manifests=tmp_path / "manifests")
    assert dataset.corpus.num_samples == N
    first = dataset[5]
    assert first["cls"] == 5 % 4 and isinstance(first["cls"], int)  # an int, not b"1"
    assert first["npy"].dtype == np.float32 and first["npy"].shape == (8,)

    model, seen, logs = Classifier(), Seen(), InMemoryLogger()
    trainer = Trainer(model=model, max_duration=f"{EPOCHS}ep",
                      train_dataloader=torch.utils.data.DataLoader(dataset, batch_size=B,
                                                                   num_workers=2),
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[InfoBatch(ratio=0.5, anneal=0.0, seed=1)],
                      callbacks=[seen], loggers=[logs], device="cpu", seed=17,
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    trainer.close()

    assert seen.dtypes == {torch.int64}
    kept = [v for _, v in logs.data["es/prune/kept"]]
    assert len(kept) == EPOCHS - 1 and all(k < N for k in kept), kept  # epochs 1 and 2 pruned
    assert seen.per_epoch[0] == N
    assert [seen.per_epoch[e] for e in (1, 2)] == [int(k) for k in kept]
    assert not (tmp_path / "manifests" / f"epoch={EPOCHS:05d}").exists()  # none past the run
