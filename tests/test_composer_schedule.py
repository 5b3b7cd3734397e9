"""A short Composer run whose InfoBatch schedule prunes nothing says so: InfoBatch(ratio=0.5)
with the default anneal over max_duration="2ep" (epoch 0 has no decision yet, epoch 1 is the
annealing tail). Runs in .venv-composer; skipped elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("composer")
pytest.importorskip("streaming")

from test_composer_infobatch import make_trainer  # noqa: E402
from test_composer import write_mds  # noqa: E402

from es_stream.integrations.composer_infobatch import InfoBatch  # noqa: E402


def test_a_two_epoch_infobatch_run_warns_that_nothing_is_pruned(tmp_path: Path, caplog):
    data = write_mds(tmp_path / "mds")
    algorithm = InfoBatch(ratio=0.5, seed=3)
    trainer = make_trainer(data, algorithm, tmp_path / "manifests", epochs=2)
    with caplog.at_level(logging.INFO, logger="es_stream.pruner"), \
            pytest.warns(UserWarning, match=r"prunes no epoch of this 2-epoch run.*annealing tail"):
        trainer.fit()
    trainer.close()
    assert "nothing pruned: epoch 1 is in the annealing tail" in caplog.text  # the log says why
    assert not (tmp_path / "manifests" / "epoch=00002").exists()  # none past the run
