"""One declarative run-config table per app, resolved once into a read-only ``RunConfig``.

The apps' ``[tool.flwr.app.config]`` (``apps/*/pyproject.toml``) and the tables
(:data:`flwr_analytic.fedacnnl.config.RUN_CONFIG`, :data:`flwr_analytic.meta.config.RUN_CONFIG`)
hold the same keys with values the table accepts; unknown keys and bad values fail naming the key.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from flwr_analytic.config_checks import (
    Boolean,
    ConfigError,
    ConfigTable,
    Interval,
    IntList,
    Options,
    Param,
    RunConfig,
    Text,
    UnknownKeyError,
)
from flwr_analytic.fedacnnl import config as fedacnnl_config
from flwr_analytic.meta import config as meta_config

APPS = Path(__file__).resolve().parents[1] / "apps"
TABLES = {"fedacnnl": fedacnnl_config, "meta": meta_config}


def _pyproject_config(app: str) -> dict:
    with open(APPS / app / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


@pytest.mark.parametrize("app", sorted(TABLES))
def test_pyproject_and_table_hold_the_same_keys_and_values(app):
    module = TABLES[app]
    table = module.RUN_CONFIG
    given = _pyproject_config(app)
    assert sorted(given) == sorted(table.keys), (
        f"only in pyproject: {sorted(set(given) - set(table.keys))}; "
        f"only in the table: {sorted(set(table.keys) - set(given))}"
    )
    for key, value in given.items():
        assert table.check(key, value) == value
        assert value == table.params[key].default, f"{app}: {key} differs from the table default"
    cfg = module.resolve_run_config(given)
    assert dict(cfg) == module.DEFAULT_RUN_CONFIG == table.defaults
    assert all(param.help for param in table.params.values()), "every key has a one-line help"


@pytest.mark.parametrize(
    ("app", "typo", "closest"),
    [("fedacnnl", "gama", "gamma"), ("fedacnnl", "max_in_flight", "max-in-flight")]
    + [("meta", "nuu", "nu"), ("meta", "local_steps", "local-steps")],
)
def test_unknown_keys_fail_for_both_apps_naming_the_closest_key(app, typo, closest):
    module = TABLES[app]
    message = f"{typo!r}; did you mean {closest!r}"
    with pytest.raises(UnknownKeyError, match=re.escape(message)):
        module.resolve_run_config({typo: 1})
    with pytest.raises(KeyError, match=re.escape(message)):  # an UnknownKeyError is a KeyError
        module.RUN_CONFIG.check(typo, 1)


@pytest.mark.parametrize(
    ("app", "key", "value", "allowed"),
    [
        ("fedacnnl", "gamma", -1.0, "must be a number in [0, inf)"),
        ("fedacnnl", "batch-size", 2.5, "must be an integer in [1, inf)"),
        ("fedacnnl", "aggregation", "fast", "allowed values: sorted, streaming"),
        ("fedacnnl", "keep-statistics", "no", "must be true or false"),
        ("fedacnnl", "cnn-dense", "0", "comma-separated positive integers"),
        ("fedacnnl", "results-path", 3, "must be a string"),
        ("fedacnnl", "dataset", "hub:", "hub:<repo id>"),
        ("fedacnnl", "dp-seed", -2, "must be an integer in [-1, inf)"),
        ("meta", "algorithm", "scaffold", "allowed values: meta, fedavg"),
        ("meta", "beta", 0.0, "must be a number in (0, inf)"),
        ("meta", "fraction-train", True, "must be a number in (0, 1]"),
    ],
)
def test_a_bad_value_names_the_key_and_what_is_allowed(app, key, value, allowed):
    module = TABLES[app]
    pattern = f"^{re.escape(key)}: {re.escape(repr(value))} is not allowed; .*{re.escape(allowed)}"
    with pytest.raises(ConfigError, match=pattern):
        module.resolve_run_config({key: value})
    with pytest.raises(ConfigError, match=pattern):
        module.RUN_CONFIG.check(key, value)


def test_rules_between_keys_run_in_resolve():
    ok = {"dp-noise-multiplier": 1.0, "dp-clip-norm": 3.0}
    assert fedacnnl_config.resolve_run_config(ok)["dp-clip-norm"] == 3.0
    assert fedacnnl_config.RUN_CONFIG.check("dp-noise-multiplier", 1.0) == 1.0  # one key: fine
    with pytest.raises(ConfigError, match="^dp-clip-norm: 0.0 is not allowed; must be > 1"):
        fedacnnl_config.resolve_run_config({"dp-noise-multiplier": 1.0})


@pytest.mark.parametrize("app", sorted(TABLES))
def test_resolve_is_idempotent_and_the_result_read_only(app):
    module = TABLES[app]
    cfg = module.resolve_run_config({"seed": 7})
    assert isinstance(cfg, RunConfig) and cfg.table is module.RUN_CONFIG
    assert module.resolve_run_config(cfg) is cfg
    assert module.RUN_CONFIG.resolve(cfg) is cfg
    assert module.resolve_run_config(dict(cfg)) == cfg  # a plain copy is checked again
    other = TABLES["meta" if app == "fedacnnl" else "fedacnnl"]
    with pytest.raises(UnknownKeyError):  # another app's resolved config is not this app's
        other.resolve_run_config(cfg)
    with pytest.raises(TypeError, match="read-only"):
        cfg["seed"] = 1
    for change in (
        lambda: cfg.update(seed=1),
        lambda: cfg.pop("seed"),
        lambda: cfg.setdefault("x", 1),
        lambda: cfg.clear(),
        lambda: cfg.popitem(),
        lambda: cfg.__delitem__("seed"),
        lambda: cfg.__ior__({"seed": 1}),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert cfg["seed"] == 7 and cfg.get("seed") == 7 and len(cfg) == len(module.RUN_CONFIG.keys)
    assert json.loads(json.dumps(dict(cfg))) == dict(cfg) == json.loads(json.dumps(cfg))
    assert {**cfg, "seed": 1}["seed"] == 1 and type(cfg | {"seed": 1}) is dict
    assert copy.copy(cfg) is cfg and copy.deepcopy(cfg) is cfg
    assert pickle.loads(pickle.dumps(cfg)) == dict(cfg)
    assert list(cfg) == list(module.RUN_CONFIG.keys)  # table order


@pytest.mark.parametrize("app", sorted(TABLES))
def test_check_agrees_with_resolve(app):
    module = TABLES[app]
    samples = [0, 1, -1, 2.5, 0.5, -0.5, True, "", "3,4", "x", "digits", "mnist", "sorted", "meta"]
    for key in module.RUN_CONFIG.keys:
        for value in samples:
            try:
                module.RUN_CONFIG.check(key, value)
                single = None
            except ConfigError as exc:
                single = str(exc)
            try:
                module.resolve_run_config({key: value})
                whole = None
            except ConfigError as exc:
                whole = str(exc)
            if single is None and whole is not None:  # only a rule between keys may add to check
                assert whole.startswith("dp-clip-norm:"), (key, value, whole)
            else:
                assert single == whole, (key, value)


def test_fedacnnl_dp_config_comes_from_the_table():
    off = fedacnnl_config.dp_config(fedacnnl_config.resolve_run_config())
    assert not off.enabled
    cfg = fedacnnl_config.resolve_run_config(
        {"dp-noise-multiplier": 1.5, "dp-clip-norm": 3.0, "dp-target-bound": 2.0}
    )
    dp = fedacnnl_config.dp_config(cfg)
    assert (dp.noise_multiplier, dp.clip_norm, dp.target_bound) == (1.5, 3.0, 2.0)


def test_one_table_of_dataset_shapes():
    from flwr_analytic.data import DATASETS
    from flwr_analytic.meta import task

    assert fedacnnl_config.DATASET_SHAPES is task.DATASET_SHAPES is task.DATASET_INFO
    assert set(task.DATASET_SHAPES) == set(DATASETS)


def test_client_boundary_resolves_once_with_node_dp_keys():
    from flwr_analytic.clients.fedacnnl_client import resolved_context

    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2, "dp-noise-multiplier": 1.0},
        state=RecordDict(),
        run_config={"dp-clip-norm": 3.0, "seed": 4},
    )
    resolved = resolved_context(context, {"seed": 5})
    cfg = resolved.run_config
    assert isinstance(cfg, RunConfig) and resolved.state is context.state
    assert (cfg["seed"], cfg["dp-noise-multiplier"], cfg["dp-clip-norm"]) == (5, 1.0, 3.0)
    assert resolved_context(resolved) is resolved  # already resolved: nothing to do
    with pytest.raises(UnknownKeyError, match="did you mean 'seed'"):
        resolved_context(context, {"sed": 1})


def test_app_factories_check_their_overrides():
    from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
    from flwr_analytic.clients.meta_client import make_meta_client_app

    with pytest.raises(UnknownKeyError, match="did you mean 'gamma'"):
        make_fedacnnl_client_app(run_config={"gama": 1.0})
    with pytest.raises(ConfigError, match="^nu: -1 is not allowed"):
        make_meta_client_app({"nu": -1})


def test_table_machinery():
    def even(value):
        """must be an even integer"""
        return isinstance(value, int) and value % 2 == 0

    table = ConfigTable(
        (
            Param("n", 2, even, "an even number"),
            Param("rate", 0.5, Interval(float, 0, 1, closed="neither"), "in (0, 1)"),
            Param("mode", "a", Options(("a", "b")), "a mode"),
            Param("flag", False, Boolean(), "a flag"),
            Param("name", "", Text(), "a name"),
            Param("widths", "", IntList(), "widths"),
        ),
        where="test-config",
    )
    assert table.keys == ("n", "rate", "mode", "flag", "name", "widths")
    assert table.resolve({"n": 4, "widths": "8, 16"})["widths"] == "8, 16"
    with pytest.raises(ConfigError, match="^n: 3 is not allowed; must be an even integer$"):
        table.check("n", 3)
    with pytest.raises(ConfigError, match=re.escape("must be a number in (0, 1)")):
        table.check("rate", 1.0)
    with pytest.raises(ConfigError, match="allowed values: a, b"):
        table.check("mode", True)
    with pytest.raises(ConfigError):
        table.check("rate", float("nan"))
    with pytest.raises(UnknownKeyError, match="unknown test-config key 'mod'; did you mean 'mode'"):
        table.resolve({"mod": "a"})
    with pytest.raises(ConfigError, match="^n: 1 is not allowed"):  # a default must be allowed
        ConfigTable((Param("n", 1, even),))
    with pytest.raises(ValueError, match="duplicate key 'n'"):
        ConfigTable((Param("n", 2, even), Param("n", 4, even)))
    assert "rate = 0.5  # in (0, 1) (must be a number in (0, 1))" in table.describe()
