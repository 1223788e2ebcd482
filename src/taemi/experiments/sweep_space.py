"""The search space of ``taemi sweep``: a YAML file of dotted config keys, each a range or a
choice, checked against the config before anything is trained (see
:mod:`taemi.experiments.sweep` for the file's format)."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

from taemi.config import ConfigError, RunConfig, apply_override


def _number(value: Any, where: str, name: str) -> int | float:
    """A bound or step as a number; YAML 1.1 reads ``1e-5`` (no dot) as a string, so
    numeric strings are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be finite, got {value!r}")
    return value


def _get(cfg: RunConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _checked_value(base: RunConfig, key: str, value: Any, where: str) -> Any:
    """``value`` as the config field ``key`` holds it, once the config accepts it."""
    cfg = copy.deepcopy(base)
    try:
        apply_override(cfg, key, value)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return _get(cfg, key)


@dataclass(frozen=True)
class Range:
    """A numeric range of one config field: floats or integers (the field's type)."""

    key: str  # dotted config key, also the Optuna parameter name
    low: int | float
    high: int | float
    integer: bool  # the field is an int: suggest_int
    log: bool = False  # sample on a log scale
    step: int | float | None = None  # a grid of low, low + step, ..., high

    def suggest(self, trial) -> int | float:
        if self.integer:
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def record(self) -> dict:
        out: dict = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def position(self, value: float) -> float:
        """``value`` on the range's axis, 0 at low, 1 at high (log axis for a log range)."""
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            return (math.log(value) - lo) / (hi - lo)
        return (value - self.low) / (self.high - self.low)

    def axis_labels(self) -> tuple[str, str]:
        return f"{self.low:g}", f"{self.high:g}"


@dataclass(frozen=True)
class Choice:
    """A categorical choice of one config field (scalars: Optuna stores them as they are)."""

    key: str
    choices: tuple

    def suggest(self, trial) -> Any:
        return trial.suggest_categorical(self.key, list(self.choices))

    def record(self) -> dict:
        return {"choices": list(self.choices)}

    def position(self, value: Any) -> float:
        n = len(self.choices)
        return 0.5 if n == 1 else self.choices.index(value) / (n - 1)

    def axis_labels(self) -> tuple[str, str]:
        return str(self.choices[0]), str(self.choices[-1])


Param = Range | Choice


def _read_range(key: str, spec: dict, base: RunConfig, where: str) -> Range:
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{where}: a range needs low and high (missing {', '.join(missing)})")
    low, high = _number(spec["low"], where, "low"), _number(spec["high"], where, "high")
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log_scale!r}")
    step = None if spec.get("step") is None else _number(spec["step"], where, "step")
    try:
        kind = _get(base, key)
    except AttributeError:  # not a config key: the override machinery says why
        kind = _checked_value(base, key, low, where)
    if isinstance(kind, bool) or not isinstance(kind, (int, float)):
        raise ConfigError(
            f"{where}: {key} holds a {type(kind).__name__}, not a number; use choices: [...]"
        )
    integer = isinstance(kind, int)
    if integer:
        for name, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and not float(v).is_integer():
                raise ConfigError(f"{where}: {key} is an integer setting; {name} {v!r} is not")
        low, high = int(low), int(high)
        step = None if step is None else int(step)
    else:
        low, high = float(low), float(high)
        step = None if step is None else float(step)
    if not low < high:
        raise ConfigError(f"{where}: low {low!r} must be below high {high!r}")
    if log_scale and step is not None:
        raise ConfigError(
            f"{where}: log and step cannot be combined (Optuna samples one or the other)"
        )
    if log_scale and low <= 0:
        raise ConfigError(f"{where}: a log range must stay above 0, got low {low!r}")
    if step is not None:
        if step <= 0:
            raise ConfigError(f"{where}: step must be > 0, got {step!r}")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise ConfigError(
                f"{where}: step {step!r} does not divide the range {low!r}..{high!r}; "
                "make high - low a multiple of it"
            )
    for name, v in (("low", low), ("high", high)):
        _checked_value(base, key, v, f"{where} ({name} {v!r})")
    return Range(key, low, high, integer, log_scale, step)


def _read_choice(key: str, spec: dict, base: RunConfig, where: str) -> Choice:
    others = sorted(set(spec) - {"choices"})
    if others:
        raise ConfigError(f"{where}: choices cannot be combined with {', '.join(others)}")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
    for c in choices:
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise ConfigError(
                f"{where}: choice {c!r} is not a scalar (a tuple setting takes a "
                "comma-separated string, e.g. 'audio,text')"
            )
        _checked_value(base, key, c, f"{where} (choice {c!r})")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}: choices repeat a value: {choices!r}")
    return Choice(key, tuple(choices))


def read_space(path: str | os.PathLike, base: RunConfig) -> list[Param]:
    """The parameters of a space file, each checked against ``base`` (see the module
    docstring); errors name the file and the entry."""
    from taemi.config import load_yaml

    try:
        data = load_yaml(path)
    except ConfigError as e:
        raise ConfigError(f"--space {path}: {e}") from None
    if not data:
        raise ConfigError(
            f"--space {path}: no parameters (expected entries such as "
            "'train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}')"
        )
    space: list[Param] = []
    for key, spec in data.items():
        where = f"--space {path}, entry {key!r}"
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{where}: expected a mapping (low/high[/log/step] or choices), got {spec!r}; "
                "write dotted keys at the top level (train.lr: {...})"
            )
        unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(map(str, unknown))} "
                "(a range has low, high, log, step; a choice has choices)"
            )
        if "choices" in spec:
            space.append(_read_choice(str(key), spec, base, where))
        else:
            space.append(_read_range(str(key), spec, base, where))
    return space


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with a trial's parameters (dotted key -> value) set; validated."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(cfg, key, value)
    return cfg.validate()
