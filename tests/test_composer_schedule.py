"""A short Composer run whose InfoBatch schedule prunes nothing says so: InfoBatch(ratio=0.5)
with the default anneal over max_duration="2ep" (epoch 0 has no decision yet, epoch 1 is the
annealing tail). Runs in .venv-composer; skipped elsewhere."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("composer")
pytest.importorskip("streaming")

from composer import Callback  # noqa: E402
from composer.core import State  # noqa: E402
from composer.loggers import Logger  # noqa: E402
from test_composer_infobatch import make_trainer  # noqa: E402
from test_composer import write_mds  # noqa: E402

import es_stream as es  # noqa: E402
from es_stream.integrations.composer import EvolvedSampling  # noqa: E402
from es_stream.integrations.composer import InfoBatch  # noqa: E402


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


class _WarningsAtFitStart(Callback):
    """Counts the warnings recorded so far when FIT_START reaches the callbacks (after the
    algorithms): a warning given at the Pruner's construction is already there."""

    def __init__(self, record: list) -> None:
        self.record = record
        self.at_fit_start: list[str] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.at_fit_start = [str(w.message) for w in self.record]


@pytest.mark.parametrize("make", [
    lambda: InfoBatch(ratio=0.5, seed=3),
    lambda: EvolvedSampling(batch_size=8, policy=es.ESWPPolicy(ratio=0.5, anneal=0.5)),
], ids=["InfoBatch", "EvolvedSampling"])
def test_the_algorithms_give_the_pruner_the_runs_length(tmp_path: Path, make):
    """The warning comes at FIT_START, before any epoch is trained: the Pruner was built with
    epochs=max_duration."""
    data = write_mds(tmp_path / "mds")
    algorithm = make()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        probe = _WarningsAtFitStart(record)
        trainer = make_trainer(data, algorithm, tmp_path / "manifests", epochs=2,
                               callbacks=[probe])
        trainer.fit()
    trainer.close()
    assert probe.at_fit_start is not None
    assert any("prunes no epoch of this 2-epoch run" in m for m in probe.at_fit_start), \
        probe.at_fit_start


def test_another_runs_manifests_are_refused_unless_overwrite(tmp_path: Path):
    """An EvolvedSampling run after an InfoBatch run in the same manifest directory is refused
    naming it; overwrite=True replaces the other run's manifests."""
    data, manifests = write_mds(tmp_path / "mds"), tmp_path / "manifests"
    first = make_trainer(data, InfoBatch(ratio=0.5, anneal=0.0, seed=3), manifests, epochs=2)
    first.fit()
    first.close()
    assert (manifests / "epoch=00001").is_dir()
    infobatch_run = json.loads((manifests / "_run.json").read_text())
    policy = es.ESWPPolicy(ratio=0.3, anneal=0.0)
    second = make_trainer(data, EvolvedSampling(batch_size=8, policy=policy), manifests, epochs=2)
    with pytest.raises(es.ManifestError, match=re.escape(str(manifests))):
        second.fit()
    second.close()
    third = make_trainer(data, EvolvedSampling(batch_size=8, policy=policy, overwrite=True),
                         manifests, epochs=2)
    third.fit()
    third.close()
    run = json.loads((manifests / "_run.json").read_text())
    assert run["run_id"] != infobatch_run["run_id"]
    assert (run["settings"]["policy"], run["settings"]["ratio"]) == ("es", "0.3"), run


def test_overwrite_must_be_a_bool():
    with pytest.raises(TypeError, match="overwrite"):
        InfoBatch(overwrite="yes")
    with pytest.raises(TypeError, match="overwrite"):
        EvolvedSampling(batch_size=8, overwrite=1)
