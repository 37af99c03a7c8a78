"""Declarative configuration tables: every key with its default, allowed values and one-line help.

In the spirit of scikit-learn's ``_parameter_constraints`` (``sklearn/utils/_param_validation.py``):
an app declares its run config once as a :class:`ConfigTable` of :class:`Param` rows, each with a
constraint (:class:`Interval`, :class:`Options`, :class:`Boolean`, :class:`Text`, :class:`IntList`
or a predicate, :class:`Satisfies`). :meth:`ConfigTable.resolve` turns what Flower hands over into a
read-only :class:`RunConfig`, once, at the app boundary; a bad value (a negative ridge γ, an unknown
scheme) or a typo in a key stops the run at start with a message naming the key and what is
allowed, instead of NaNs or a crash after layers were computed. The strategies' constructors use
the same checks (:func:`check_number`, :func:`check_choice`). No Flower imports.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal, NoReturn


class ConfigError(ValueError):
    """A configuration value or key that is not allowed (the message names the key)."""


class UnknownKeyError(ConfigError, KeyError):
    """A configuration key that is not known (also a ``KeyError``, as a missing mapping key is)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------------ keys
def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to ``key`` (``difflib``, similarity >= 0.6), or ``None``."""
    match = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_message(key: str, known: Iterable[str], where: str) -> str:
    """``unknown <where> key 'gama'; did you mean 'gamma'? Known: ...``."""
    known = list(known)
    hint = closest_key(key, known)
    did = f"; did you mean {hint!r}?" if hint else ""
    return f"unknown {where} key {key!r}{did} Known keys: {', '.join(known)}"


def check_keys(
    given: Mapping[str, Any] | Iterable[str],
    known: Iterable[str],
    where: str,
    *,
    action: Literal["raise", "warn"] = "raise",
) -> list[str]:
    """Report keys of ``given`` that are not in ``known``, naming the closest known key.

    Parameters
    ----------
    given : mapping or iterable of str
        The keys to check.
    known : iterable of str
        The valid keys.
    where : str
        What the keys belong to ("run-config"), for the message.
    action : {"raise", "warn"}
        ``raise``: :class:`UnknownKeyError` (a ``ConfigError`` and a ``KeyError``);
        ``warn``: a ``UserWarning`` per unknown key.

    Returns
    -------
    list of str
        The unknown keys (when warning).

    """
    known = list(known)
    unknown = [k for k in given if k not in known]
    for key in unknown:
        message = unknown_key_message(key, known, where)
        if action == "raise":
            raise UnknownKeyError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return unknown


# ----------------------------------------------------------------------------- constraints
class Constraint:
    """What a value must be; ``str(constraint)`` says it after ``"<key>: <value> is not allowed; "``."""

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        raise NotImplementedError

    def fail(self, key: str, value: Any) -> NoReturn:
        """Raise :class:`ConfigError` naming ``key``, ``value`` and what is allowed."""
        raise ConfigError(f"{key}: {value!r} is not allowed; {self}")

    def check(self, key: str, value: Any) -> Any:
        """``value`` if allowed; else :class:`ConfigError` (see :meth:`fail`)."""
        if not self.is_satisfied_by(value):
            self.fail(key, value)
        return value

    def typed(self, value: Any) -> Any:
        """An allowed ``value`` as the type it stands for (here: itself)."""
        return value


@dataclass(frozen=True)
class Interval(Constraint):
    """A finite number (``kind=float``; ints count) or an integer (``kind=int``) in an interval.

    ``low`` / ``high`` ``None`` is unbounded; ``closed`` says which ends belong to the interval
    (as scikit-learn's ``Interval``). Booleans are not numbers here.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    closed: Literal["both", "left", "right", "neither"] = "both"

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        integer = self.kind is int
        if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
            return False
        v = float(value)
        if not math.isfinite(v):
            return False
        low_open = self.closed in ("right", "neither")
        high_open = self.closed in ("left", "neither")
        bad_low = self.low is not None and (v <= self.low if low_open else v < self.low)
        bad_high = self.high is not None and (v >= self.high if high_open else v > self.high)
        return not (bad_low or bad_high)

    def typed(self, value: Any) -> Any:
        """An allowed ``value`` as :attr:`kind` (``1`` -> ``1.0`` for a number interval)."""
        return self.kind(value)

    def __str__(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        lo = "(" if self.closed in ("right", "neither") or self.low is None else "["
        hi = ")" if self.closed in ("left", "neither") or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"must be {kind} in {lo}{low}, {high}{hi}"


@dataclass(frozen=True)
class Options(Constraint):
    """One of ``values`` (compared with ``==``; ``True`` is not ``1`` here)."""

    values: tuple[Any, ...]

    def __init__(self, values: Iterable[Any]) -> None:
        object.__setattr__(self, "values", tuple(values))

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if isinstance(value, bool):
            return any(v is value for v in self.values)
        return value in self.values

    def __str__(self) -> str:
        return f"allowed values: {', '.join(map(str, self.values))}"


class Boolean(Constraint):
    """``True`` or ``False`` (TOML ``true`` / ``false``; not ``0``, ``1`` or ``"no"``)."""

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        return isinstance(value, bool)

    def __str__(self) -> str:
        return "must be true or false"


class Text(Constraint):
    """Any string (a path, a name; ``""`` is allowed)."""

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        return isinstance(value, str)

    def __str__(self) -> str:
        return "must be a string"


class IntList(Constraint):
    """Comma-separated positive integers like ``"32,64"``; ``""`` (the default) is allowed."""

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if not isinstance(value, str):
            return False
        try:
            return all(w >= 1 for w in int_list(value))
        except ValueError:
            return False

    def __str__(self) -> str:
        return 'must be comma-separated positive integers like "32,64" (or "" for the default)'


@dataclass(frozen=True)
class Satisfies(Constraint):
    """A value for which ``predicate(value)`` is true; ``description`` says what is allowed."""

    predicate: Callable[[Any], bool]
    description: str

    def is_satisfied_by(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        return bool(self.predicate(value))

    def __str__(self) -> str:
        return self.description


def int_list(text: Any) -> tuple[int, ...]:
    """``"32, 64"`` -> ``(32, 64)``; ``""`` -> ``()`` (``ValueError`` on a non-integer)."""
    return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is one of ``allowed``; else :class:`ConfigError` listing them."""
    allowed = list(allowed)
    if value not in allowed:
        Options(allowed).fail(key, value)
    return value


def check_number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """``value`` if it is a finite (integer) number in the interval; else :class:`ConfigError`.

    The interval is ``[low, high]``, with ``low_open`` / ``high_open`` excluding an end; a missing
    end is unbounded (:class:`Interval`).
    """
    closed = {(False, False): "both", (False, True): "left", (True, False): "right"}
    interval = Interval(
        int if integer else float, low, high, closed.get((low_open, high_open), "neither")
    )
    return interval.check(key, value)


# ---------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Param:
    """One configuration key: its default, what is allowed (``check``) and a one-line ``help``.

    ``check`` is a :class:`Constraint` or a predicate ``value -> bool`` (wrapped in
    :class:`Satisfies`, described by the first line of its docstring).
    """

    key: str
    default: Any
    check: Constraint | Callable[[Any], bool]
    help: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.check, Constraint):
            doc = (getattr(self.check, "__doc__", None) or "").strip().splitlines()
            text = doc[0] if doc else f"must satisfy {getattr(self.check, '__name__', 'a check')}"
            object.__setattr__(self, "check", Satisfies(self.check, text))

    @property
    def constraint(self) -> Constraint:
        """:attr:`check` as a :class:`Constraint`."""
        assert isinstance(self.check, Constraint)
        return self.check


class RunConfig(dict[str, Any]):
    """A resolved, read-only run config: every key of its :class:`ConfigTable`, all values checked.

    Made by :meth:`ConfigTable.resolve` only. Reads like the plain ``dict`` it replaces
    (``cfg["min-nodes"]``, ``cfg.get``, ``dict(cfg)``, ``{**cfg, "seed": 1}``, ``json.dumps``) —
    it is a ``dict`` subclass so that code and libraries that take a ``dict`` (Flower's
    ``Context.run_config``, JSON writers) keep working — but every change raises ``TypeError``:
    build a new one with ``table.resolve({**cfg, key: value})``. Copies are the object itself
    (values are strings, numbers and booleans); a pickled one comes back as a plain ``dict``.
    """

    __slots__ = ("_table",)

    def __init__(self, values: Mapping[str, Any], table: ConfigTable) -> None:
        super().__init__(values)
        self._table = table

    @property
    def table(self) -> ConfigTable:
        """The table that resolved this config."""
        return self._table

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"a resolved {self._table.where} is read-only; "
            "make a new one with resolve({**cfg, key: value})"
        )

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> RunConfig:
        return self

    __copy__ = __deepcopy__

    def __reduce__(self) -> tuple[type[dict], tuple[dict[str, Any]]]:
        return dict, (dict(self),)

    def __repr__(self) -> str:
        return f"RunConfig({dict.__repr__(self)})"

    def kwargs(self, *keys: str, **renamed: str) -> dict[str, Any]:
        """Keyword arguments of values, each typed by its row (:meth:`Constraint.typed`).

        A key names its keyword in snake case; ``renamed`` maps other keywords to their keys:
        ``cfg.kwargs("lam-rule", inner_steps="pfedme-k")`` is ``{"lam_rule": "relative",
        "inner_steps": 5}``.
        """
        named = {key.replace("-", "_"): key for key in keys} | renamed
        rows = self._table.params
        return {name: rows[key].constraint.typed(self[key]) for name, key in named.items()}


class ConfigTable:
    """A declarative table of configuration keys; :meth:`resolve` makes the :class:`RunConfig`.

    Parameters
    ----------
    params : iterable of Param
        One row per key, in the order of the resolved config.
    where : str (default: "run-config")
        What the keys belong to, for messages (``unknown run-config key 'gama'``).
    cross_check : callable, optional
        ``cross_check(cfg)`` for rules between keys that no single-key constraint can state; it
        raises :class:`ConfigError` naming a key. Called by :meth:`resolve` after every key passed.

    Raises
    ------
    ValueError
        When two rows share a key or a default is not allowed by its own row.

    """

    def __init__(
        self,
        params: Iterable[Param],
        where: str = "run-config",
        cross_check: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.params: dict[str, Param] = {}
        for param in params:
            if param.key in self.params:
                raise ValueError(f"duplicate key {param.key!r} in the {where} table")
            param.constraint.check(param.key, param.default)
            self.params[param.key] = param
        self.where = where
        self.cross_check = cross_check

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key, in table order."""
        return tuple(self.params)

    @property
    def defaults(self) -> dict[str, Any]:
        """A new ``dict`` of every key's default."""
        return {key: p.default for key, p in self.params.items()}

    def check(self, key: str, value: Any) -> Any:
        """``value`` if ``key`` is known and allows it (rules between keys aside).

        Raises :class:`UnknownKeyError` for an unknown ``key``, naming the closest known key, and
        :class:`ConfigError` for a value that is not allowed, naming the key and what is allowed.
        """
        if key not in self.params:
            check_keys([key], self.params, self.where)
        return self.params[key].constraint.check(key, value)

    def check_overrides(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """A new ``dict`` of ``overrides`` (an app factory's ``run_config``), each :meth:`check`-ed."""
        return {key: self.check(key, value) for key, value in (overrides or {}).items()}

    def resolve(self, given: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults overridden by ``given``, every key and value checked, as a :class:`RunConfig`.

        Idempotent: a :class:`RunConfig` of this table is returned as it is (it was checked).

        Raises
        ------
        UnknownKeyError
            (a ``KeyError``) for a key not in the table, naming the closest known key (a likely
            typo: ``gama`` -> ``gamma``).
        ConfigError
            (a ``ValueError``) for a value that is not allowed, naming the key and what is allowed.

        """
        if isinstance(given, RunConfig) and given.table is self:
            return given
        given = dict(given or {})
        check_keys(given, self.params, self.where)
        values = {key: given.get(key, p.default) for key, p in self.params.items()}
        self.check_overrides(given)
        if self.cross_check is not None:
            self.cross_check(values)
        return RunConfig(values, self)

    def describe(self) -> str:
        """One line per key: ``key = default  # help (allowed)``, e.g. for docs."""
        return "\n".join(
            f"{k} = {p.default!r}  # {p.help} ({p.constraint})" for k, p in self.params.items()
        )

    def __repr__(self) -> str:
        return f"ConfigTable({self.where!r}, {len(self.params)} keys)"


__all__ = [
    "Boolean",
    "ConfigError",
    "ConfigTable",
    "Constraint",
    "IntList",
    "Interval",
    "Options",
    "Param",
    "RunConfig",
    "Satisfies",
    "Text",
    "UnknownKeyError",
    "check_choice",
    "check_keys",
    "check_number",
    "closest_key",
    "int_list",
    "unknown_key_message",
]
