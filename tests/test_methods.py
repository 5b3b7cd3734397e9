"""The method registry (pipelines.methods): every entry builds, every budget control points to a
method, the loop, the benchmark's planner and the pipelines' command lines accept exactly the
registry's names, and a method registered here, in the test, trains through the loop and is
planned by the benchmark without any other file changed."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

pytest.importorskip("mnist1d")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `pipelines` is not an installed package
sys.path.insert(0, str(ROOT / "tools"))

import es_stream  # noqa: E402
from benchtrain import experiments as P  # noqa: E402
from pipelines import loop  # noqa: E402
from pipelines import methods as registry  # noqa: E402
from pipelines.mnist1d import __main__ as m1d_cli  # noqa: E402
from pipelines.mnist1d import data as m1d_data  # noqa: E402
from pipelines.mnist1d import train as m1d  # noqa: E402
from pipelines.textlm import __main__ as text_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, b, B = 120, 8, 24


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return m1d_data.build(tmp_path_factory.mktemp("data") / "mnist1d", N, 60, 0.0, 42, "wds")


def context(corpus, tmp_path: Path, **config) -> registry.Context:
    """A context as the loop makes one, with random scores standing in for a reference (and
    its losses on clean text) and a side table of kinds (every tenth sample junk) for the
    oracle."""
    kinds = (torch.arange(corpus.num_samples) % 10 == 0).long()
    workload = loop.Workload("test", corpus, lambda: None, lambda m, d: d, lambda m: 0.0, "q",
                             True, list, sample_kinds=kinds, kind_names=("clean", "junk"))
    ref = loop.Reference(str(tmp_path / "ref.npy"), clean_losses=(0.2, 0.5, 0.9))
    return registry.Context(corpus, b, 0, total_steps=20, steps_per_epoch=N // B,
                            config=loop.RunConfig(2, b=b, B=B, reference=ref, **config),
                            es_options={}, reference=registry.random_scores(corpus, 1),
                            chance_loss=math.log(10), manifests=str(tmp_path / "manifests"),
                            workload=workload)


def test_every_entry_builds_what_it_declares(data, tmp_path: Path) -> None:
    assert registry.names(), "the registry is empty"
    for spec in registry.methods():
        ctx = context(data.corpus, tmp_path)
        selector = spec.selector(ctx) if spec.selector is not None else None
        assert selector is None or isinstance(selector, es_stream.Selector), spec.name
        assert selector is not None or spec.batch_of_b, spec.name  # a selecting method selects
        if spec.es_options:
            assert hasattr(selector, "store"), spec.name      # the ES rule keeps scores
        if spec.train_loss_scores == "selector":
            assert callable(getattr(selector, "record", None)), spec.name
        pruner = spec.pruner(ctx, selector) if spec.pruner is not None else None
        assert (pruner is None) == (spec.prune is None), spec.name
        if pruner is not None:
            assert isinstance(pruner, es_stream.Pruner) or spec.name.startswith("dedup"), spec.name
            if spec.prune == "once":   # the policy accepts the store it is given
                pruner.policy.check(pruner.store)
        if spec.schedule is not None:
            es_stream.BatchSchedule(spec.schedule, b, B, 0.5)
        assert spec.run_options() <= set(P.run_options()[spec.name])
        assert spec.cost > 0, spec.name


def test_a_method_whose_needs_are_missing_is_refused_naming_them(data, tmp_path: Path) -> None:
    ctx = context(data.corpus, tmp_path)
    no_reference = registry.Context(**{**ctx.__dict__, "reference": None})
    for spec in registry.methods():
        if spec.oracle:   # the side table of kinds is what an oracle needs
            no_labels = registry.Context(**{**ctx.__dict__, "workload": None})
            with pytest.raises(ValueError, match="side table"):
                spec.pruner(no_labels, None)
    for spec in registry.methods():
        if spec.reference:
            with pytest.raises(ValueError, match="reference"):
                if spec.selector is not None:
                    spec.selector(no_reference)
                else:
                    spec.pruner(no_reference, None)
    with pytest.raises(ValueError, match="needs a selector"):
        registry.Method("nothing_to_select_with")
    with pytest.raises(ValueError, match="prune and pruner together"):
        registry.Method("half_a_pruner", batch_of_b=True, prune="epoch")
    with pytest.raises(ValueError, match="taken"):
        registry.register(registry.Method("uniform", batch_of_b=True))
    with pytest.raises(ValueError, match="reserved"):
        registry.register(registry.Method("budget_x", batch_of_b=True))


def test_every_budget_control_points_to_a_registered_method() -> None:
    controls = registry.controls()
    assert controls and set(P.BUDGET) == set(controls)
    labels = registry.labels()
    for control, of in controls.items():
        assert of in registry.names() and control == registry.BUDGET_PREFIX + of
        assert registry.get(of).control and registry.get(of).control in labels[control]
        assert P.cost_factor(control) == registry.get(of).cost
        # a control trains uniform batches for the method's time: the loop runs it as uniform
        from benchtrain.run import loop_method
        assert loop_method(control) == "uniform"


def test_the_loop_the_planner_and_the_clis_accept_exactly_the_registry(tmp_path: Path) -> None:
    names = registry.names()
    assert len(set(names)) == len(names)
    assert set(loop.ALL_METHODS) == set(names)
    store = tmp_path / "ref.npy"
    store.write_bytes(b"")
    config = loop.RunConfig(1, reference=loop.Reference(str(store)))
    for name in names:
        config.check(name)
    with pytest.raises(ValueError, match="unknown method 'not_a_method'"):
        config.check("not_a_method")
    # the benchmark: the registry's methods, uniform_B and one control per method with one
    assert set(P.METHODS) == set(names) | {registry.UNIFORM_B} | set(registry.controls())
    assert set(P.MAIN_METHODS) <= set(P.METHODS)   # the default --methods are all known
    args = P.parse_args(["--workload", "mnist1d", "--methods", ",".join(P.METHODS)])
    assert args.methods == list(P.METHODS)
    assert set(P.run_options()) == set(P.METHODS)
    with pytest.raises(SystemExit):
        P.parse_args(["--workload", "mnist1d", "--methods", "uniform,not_a_method"])
    # the pipelines' command lines: the loop's methods, not the benchmark's controls
    for cli in (m1d_cli, text_cli):
        assert cli.parse_args(["--methods", ",".join(names)]).methods == list(names)
        with pytest.raises(SystemExit):
            cli.parse_args(["--methods", f"uniform,{registry.UNIFORM_B}"])


# ----------------------------------------------------------------------------- a new method
class SmallestLossSelector(es_stream.Selector):
    """The b smallest losses: a method no file of the project knows."""

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        self._observe(losses)
        return (-losses.detach()).topk(self.batch_size, sorted=False).indices


@pytest.fixture
def smallest_loss() -> Iterator[list[SmallestLossSelector]]:
    """Register ``smallest_loss`` for one test; yields the selectors the loop makes of it."""
    made: list[SmallestLossSelector] = []

    def factory(ctx: registry.Context) -> SmallestLossSelector:
        made.append(SmallestLossSelector(ctx.b, seed=ctx.seed))
        return made[-1]

    registry.register(registry.Method("smallest_loss", factory, control="easy-first", cost=0.9))
    try:
        yield made
    finally:
        registry.unregister("smallest_loss")
    assert "smallest_loss" not in registry.names()


def test_a_method_registered_in_a_test_trains_through_the_loop_and_is_planned(
        data, smallest_loss, tmp_path: Path) -> None:
    w = m1d.workload(data.corpus, data.test_x, data.test_y)
    epochs = 2
    r = loop.train(w, "smallest_loss", loop.RunConfig(epochs, b=b, B=B, seed=1, progress=False))
    per_epoch = math.ceil(N / B)
    assert r["method"] == "smallest_loss" and r["steps"] == epochs * per_epoch
    assert r["samples_scored"] == epochs * N       # every sample through the scoring forward
    assert r["samples_backpropagated"] == epochs * per_epoch * b
    assert len(r["curve"]) == epochs and math.isfinite(r[f"final_{w.quality}"])
    (selector,) = smallest_loss
    assert selector.step == epochs * per_epoch     # the loop drove the registered selector
    # its selections are the smallest losses: check one meta-batch directly
    losses = torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0, 4.0, 0.2, 5.0, 0.3, 6.0, 0.4, 7.0])
    chosen = SmallestLossSelector(4).select(torch.arange(12), losses)
    assert sorted(chosen.tolist()) == [3, 6, 8, 10]
    # the benchmark plans it and its budget control, keyed by B (it selects b of B)
    args = P.parse_args(["--workload", "mnist1d", "--methods",
                         "uniform,smallest_loss,budget_smallest_loss", "--dry-run"])
    (exp,) = P.plan(args)
    assert {r.method for r in P.measured_runs(exp)} == {"uniform", "smallest_loss"}
    assert "B" in P.run_config(exp.config, "smallest_loss")
    assert P.cut_sources(exp, "budget_smallest_loss")[-1].method == "smallest_loss"
    assert registry.labels()["budget_smallest_loss"] == "uniform, easy-first's budget"
    assert P.estimate([exp], {}, tmp_path)["runs"] == 3 * len(exp.seeds)
