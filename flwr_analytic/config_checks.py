"""Checks of configuration values that fail early with a message naming the key and what is allowed.

Used by the run configs (:mod:`flwr_analytic.fedacnnl.config`, :mod:`flwr_analytic.meta.config`) and
the strategies' constructors, so a bad value (a negative ridge γ, an unknown scheme, a typo in a key)
stops the run at start instead of producing NaNs or a crash after layers were computed. No Flower
imports.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key that is not allowed (the message names the key)."""


class UnknownKeyError(ConfigError, KeyError):
    """A configuration key that is not known (also a ``KeyError``, as a missing mapping key is)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
    action: str = "raise",
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


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is one of ``allowed``; else :class:`ConfigError` listing them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(
            f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}"
        )
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
    end is unbounded.
    """
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, Integral if integer else Real) and not isinstance(value, bool)
    if ok_type and not integer and not math.isfinite(float(value)):
        ok_type = False
    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"
    span = (
        f"{lo}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{hi}"
    )
    if not ok_type:
        raise ConfigError(f"{key}: {value!r} is not allowed; must be {kind} in {span}")
    v = float(value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        raise ConfigError(f"{key}: {value!r} is not allowed; must be {kind} in {span}")
    return value


__all__ = [
    "ConfigError",
    "UnknownKeyError",
    "check_choice",
    "check_keys",
    "check_number",
    "closest_key",
    "unknown_key_message",
]
