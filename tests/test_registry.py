"""One registry mechanism (`dbconvert/registry.py`) for families, noise processes, metrics and solvers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dbconvert
from dbconvert import families, solvers
from dbconvert import noise as nz
from dbconvert.config import load_recipe
from dbconvert.errors import DbconvertError, RecipeError
from dbconvert.evaluation import metric
from dbconvert import noise_process
from dbconvert.registry import Registry
from dbconvert.sampling import edm_sample

from tests.cli_helpers import assert_user_error, invoke
from tests.conftest import TINY_OVERRIDES

ROOT = Path(dbconvert.__file__).resolve().parents[1]
ENV = "DBCONVERT_TEST_THINGS"


def midpoint(denoised, z, t, t_next):  # noqa: ANN001, ANN201  (a solver of the one signature)
    """Explicit midpoint: D at the half-way level (geometric mean), by the block that owns it."""
    d = (z - denoised(z, t)) / t
    if t_next == 0:
        return z + (t_next - t) * d
    mid = (t * t_next) ** 0.5
    z_mid = z + (mid - t) * d
    return z + (t_next - t) * (z_mid - denoised(z_mid, mid)) / mid


@pytest.fixture
def things(monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.delenv(ENV, raising=False)
    return Registry("thing", {"a": "json:dumps", "b": "json:loads"}, ENV)


def test_names_register_unregister_and_the_environment(things: Registry) -> None:
    assert things.names() == ["a", "b"] and "a" in things and "c" not in things
    things.register("c", "os.path:join")
    assert things.names() == ["a", "b", "c"] and json.loads(os.environ[ENV]) == {"c": "os.path:join"}
    assert things.load("c") is os.path.join
    things.register("a", "json:load")  # a run-time entry wins over the built-in one
    assert things.load("a") is json.load
    things.unregister("a")
    things.unregister("c")
    assert things.load("a") is json.dumps and ENV not in os.environ


def test_unknown_names_bad_environments_and_unloadable_entries_are_one_line(
    things: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DbconvertError, match=r"^unknown thing 'z'; choose one of a, b$"):
        things.load("z")
    with pytest.raises(ValueError, match="not of the form 'module:attribute'"):
        things.register("bad", "no-colon")
    monkeypatch.setenv(ENV, "[1, 2]")
    with pytest.raises(DbconvertError, match=rf"\${ENV} must be a JSON object of name -> \"module:attr\""):
        things.names()
    monkeypatch.setenv(ENV, json.dumps({"gone": "no_such_module:thing"}))
    with pytest.raises(DbconvertError, match="thing class no_such_module:thing cannot be loaded .*PYTHONPATH"):
        things.load("gone")


def test_run_time_registrations_reach_child_processes() -> None:
    """train-all's block processes, bench workers and torchrun ranks see what this process registered."""
    noise_process.register_process("linear-toy", "tests.test_noise_process:LinearProcess")
    metric.register_metric("corner", "tests.families.toy_family:CornerMetric")
    solvers.register_solver("midpoint", "tests.test_registry:midpoint")
    try:
        code = (
            "from dbconvert import noise_process, solvers\nfrom dbconvert.evaluation import metric\n"
            "print(noise_process.process_class('linear-toy').__name__, type(metric.get_metric('corner')).__name__,"
            " solvers.get_solver('midpoint').__name__)"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
        )
        assert out.stdout.split() == ["LinearProcess", "CornerMetric", "midpoint"]
    finally:
        noise_process.unregister_process("linear-toy")
        metric.unregister_metric("corner")
        solvers.unregister_solver("midpoint")
    assert not {noise_process.PROCESSES_ENV, metric.METRICS_ENV, solvers.SOLVERS_ENV} & set(os.environ)


def test_a_metrics_help_is_what_its_class_has() -> None:
    """What `eval NAME --help` shows comes from a torch-free `MetricHelp` (issue 33) that must be the metric's own
    title, help and options; a metric registered without one (the toy's corner) is read from its class."""
    for name in metric.metric_names():
        scorer = metric.get_metric(name)
        assert metric.metric_help(name) == metric.MetricHelp(scorer.title, scorer.help, scorer.options), name
        assert len(metric.REGISTRY.paths(name)) == 2, name  # every built-in metric's help is torch-free
    metric.register_metric("corner", "tests.families.toy_family:CornerMetric")
    try:
        assert json.loads(os.environ[metric.METRICS_ENV]) == {"corner": "tests.families.toy_family:CornerMetric"}
        corner = metric.get_metric("corner")
        assert metric.metric_help("corner") == metric.MetricHelp(corner.title, corner.help, corner.options)
        metric.register_metric(
            "corner", "tests.families.toy_family:CornerMetric", "dbconvert.evaluation.metric_help:FID"
        )
        assert metric.REGISTRY.paths("corner")[1] == "dbconvert.evaluation.metric_help:FID"
        assert json.loads(os.environ[metric.METRICS_ENV])["corner"][1] == "dbconvert.evaluation.metric_help:FID"
    finally:
        metric.unregister_metric("corner")
    assert metric.METRICS_ENV not in os.environ


def test_families_bring_their_own_metrics() -> None:
    """No generic table names a family's metric module: the family's `own_metrics` registers it."""
    assert set(metric.METRICS) == {"fid", "mauve", "genppl"}
    assert {"accuracy", "bpc"} <= set(metric.metric_names())
    assert type(metric.get_metric("accuracy")).__module__ == "dbconvert.families.vit.metrics"
    families.register("toy", "tests.families.toy_family:ToyFamily", "tests.families.toy_family:ToyConfig")
    try:
        assert "corner" in metric.metric_names() and metric.get_metric("corner").lower_is_better
    finally:
        families.unregister("toy")
    assert "corner" not in metric.metric_names()
    with pytest.raises(DbconvertError, match="unknown metric 'nope'; choose one of accuracy, bpc, fid, genppl, mauve"):
        metric.get_metric("nope")


def test_the_solver_list_is_one_registry(in_tmp: Path) -> None:
    """The recipe's choices, --solver's check and help come from `solvers.SOLVERS` and run-time registrations."""
    assert solvers.solver_names() == ["euler", "heun"] and solvers.solver_choices() == "euler or heun"
    with pytest.raises(RecipeError, match="key 'sample.solver': must be euler or heun"):
        load_recipe("dit-tiny-digits", [*TINY_OVERRIDES, "sample.solver=midpoint"])
    assert_user_error(invoke("sample", "--solver", "midpoint"), "--solver must be euler or heun, not 'midpoint'")
    solvers.register_solver("midpoint", "tests.test_registry:midpoint")
    try:
        assert load_recipe("dit-tiny-digits", [*TINY_OVERRIDES, "sample.solver=midpoint"]).sample.solver == "midpoint"
        # the registered solver integrates: Gaussian data N(0, s^2) and its exact denoiser (DESIGN 3)
        s2, ts = 0.25, nz.edm_steps(24, nz.NoiseSettings())
        z = ts[0] * torch.randn(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = edm_sample(lambda i, z, sigma: s2 / (s2 + sigma**2) * z, [(0.0, 80.0)], ts, z, "midpoint")
        assert x.var().item() == pytest.approx(s2, rel=0.1)
        euler = edm_sample(lambda i, z, sigma: s2 / (s2 + sigma**2) * z, [(0.0, 80.0)], ts, z, "euler")
        assert not torch.equal(x, euler)  # the registered solver ran, not the default
    finally:
        solvers.unregister_solver("midpoint")
    with pytest.raises(DbconvertError, match="the solver must be euler or heun, not 'midpoint'"):
        solvers.get_solver("midpoint")
