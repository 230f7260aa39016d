"""The run configuration: parsed flags as one object, saved as `config.json` in every run directory.

`--config run_dir/config.json` (or the run folder itself) reloads a saved run's settings as its user gave them
(`--device auto` stays 'auto'); flags given explicitly on the command line win over it. What names one run rather than describing it
(`--exp_name`, `--resume`, `--config`) is never taken from the file: the reloaded run gets its own directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from utilities.errors import InputError
from utilities.files import read_json, write_json_atomic

log = logging.getLogger(__name__)

NOT_RELOADED = ("exp_name", "resume", "config")


TRUE_FALSE = {"true": True, "false": False}


class BoolFlag(argparse.Action):
    """A real boolean: `--x` sets True, `--no-x` (or `--no_x`) sets False. Never `type=bool`. The original
    systems' `--x True` / `--x False` (their `type=bool` flags, e.g. BMHRL's `--rl_train_worker True`) is
    accepted too, in any letter case; any other value is refused."""

    def __init__(self, option_strings: list[str], dest: str, default: bool = False, help: str | None = None):
        names = list(option_strings)
        for name in option_strings:
            if name.startswith("--"):
                names += [f"--no-{name[2:]}", f"--no_{name[2:]}"]
        super().__init__(names, dest, nargs="?", default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        negated = option_string.startswith("--no")
        if values is None:
            setattr(namespace, self.dest, not negated)
            return
        if negated:
            raise argparse.ArgumentError(None, f"argument {option_string}: takes no value, got {values}")
        if values.lower() not in TRUE_FALSE:
            raise argparse.ArgumentError(
                None, f"argument {option_string}: expected true or false (or no value), got {values}"
            )
        setattr(namespace, self.dest, TRUE_FALSE[values.lower()])

    def format_usage(self) -> str:
        return " | ".join(self.option_strings[:2])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with every default shown; a BoolFlag reads `--x [true|false], --no-x, --no_x`."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            first, *negations = action.option_strings
            return ", ".join([f"{first} [true|false]", *negations])
        return super()._format_action_invocation(action)


def ranged(
    convert: Callable[[str], Any], description: str, accept: Callable[[Any], bool]
) -> Callable[[str], Any]:
    """An argparse `type=` that converts a flag's text and refuses values outside a range at parse time, so a
    bad size or count is one line from argparse (`argument --max_len: must be a positive integer, got 0`)
    instead of a crash after hours of work. Non-finite floats are refused too."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    parse.__name__ = description  # argparse names the type in some of its own messages
    return parse


positive_int = ranged(int, "a positive integer", lambda v: v > 0)
non_negative_int = ranged(int, "a non-negative integer", lambda v: v >= 0)
positive_float = ranged(float, "a positive number", lambda v: v > 0)
non_negative_float = ranged(float, "a non-negative number", lambda v: v >= 0)
finite_float = ranged(float, "a finite number", lambda v: True)
probability = ranged(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
below_one = ranged(float, "a number in [0, 1)", lambda v: 0 <= v < 1)  # dropout, label smoothing
open_unit = ranged(float, "a number in (0, 1)", lambda v: 0 < v < 1)  # a multiplicative decay factor
tiou = ranged(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to a mistyped `word` (difflib's ratio at least 0.6), or None."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """`did you mean X? ` for the choice nearest to a mistyped `value`, or nothing."""
    match = nearest(str(value), map(str, choices))
    return f"did you mean {match}? " if match else ""


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag or value is reported on one line (no usage dump, no traceback); a mistyped flag name or
    choice names the nearest one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [extra for extra in extras if extra.startswith("-")]
            first = (flags or extras)[0]
            name = first.split("=", 1)[0]
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            match = nearest(name, known) if flags else None
            self.error(f"unrecognized argument {name}" + (f" (did you mean {match}?)" if match else ""))
        return namespace

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r} ({did_you_mean(value, action.choices)}choose from {choices})",
            )


class Config:
    """Attribute access to the run's settings; JSON round-trip with `save`/`load`. `given` names the settings
    the user gave explicitly on the command line (parsed from argv; not saved): what a resume or a loaded
    checkpoint may not silently override, or must refuse."""

    def __init__(self, given: frozenset[str] = frozenset(), **settings: Any):
        self.__dict__.update(settings)
        self.__dict__["_given"] = frozenset(given)

    @property
    def given(self) -> frozenset[str]:
        return self.__dict__.get("_given", frozenset())

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, dict(sorted(self.to_dict().items())))

    @classmethod
    def load(cls, path: str | Path) -> Config:
        settings = read_json(path)
        if not isinstance(settings, dict):
            raise InputError(f"{path}: expected a JSON object of settings, got {type(settings).__name__}")
        return cls(**settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in sorted(self.to_dict().items()))})"


def settings_for(dataclass_type: type, cfg: Any) -> dict[str, Any]:
    """The settings of `cfg` (a Config or argparse namespace) named like `dataclass_type`'s fields: a model's
    sizes are flags of the same names; fields `cfg` lacks are left out, so they keep the dataclass defaults."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(dataclass_type) if hasattr(cfg, f.name)}


def _explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The settings given on the command line itself (defaults suppressed)."""
    defaults = {}
    for action in parser._actions:
        defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    required = {a.dest: a.required for a in parser._actions}
    for action in parser._actions:
        action.required = False
    try:
        return vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
            action.required = required[action.dest]


def config_from_argv(parser: argparse.ArgumentParser, argv: list[str]) -> Config:
    """Parse `argv`; with `--config FILE`, start from FILE's settings and let explicit flags override them.
    The result's `given` names the flags on the command line."""
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        settings = vars(parser.parse_args(argv))
        return Config(given=frozenset(_explicit_flags(parser, argv)), **settings)
    explicit = _explicit_flags(parser, argv)
    try:
        saved = Config.load(config_file(explicit["config"])).to_dict()
    except InputError as e:
        parser.error(str(e))
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning(
            "%s: ignoring settings this version does not know: %s", explicit["config"], ", ".join(unknown)
        )
    reloaded = {k: v for k, v in saved.items() if k in known and k not in NOT_RELOADED}
    _check_ranges(parser, reloaded, explicit["config"])
    settings = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    settings.update(reloaded)
    settings.update(explicit)
    settings.pop("help", None)
    if settings.get("procedure") is None:
        parser.error("--procedure is required (neither given nor in the config file)")
    if settings["procedure"] not in _choices(parser, "procedure"):
        parser.error(f"unknown procedure {settings['procedure']!r} in {explicit['config']}")
    return Config(given=frozenset(explicit), **settings)


def config_file(path: str) -> Path:
    """`--config` takes the settings file itself or a run folder, whose `config.json` it then reads."""
    if not Path(path).is_dir():
        return Path(path)
    if not (Path(path) / "config.json").is_file():
        raise InputError(
            f"--config {path}: a folder without config.json (give a run folder or a config file)"
        )
    return Path(path) / "config.json"


def _check_ranges(parser: argparse.ArgumentParser, settings: dict[str, Any], source: str) -> None:
    """Hold a config file's values to the ranges and choices of the flags they stand for."""
    for action in parser._actions:
        value = settings.get(action.dest)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                if action.type is not None:
                    action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"{source}: {action.dest} {item!r}: {e}")
            if action.choices is not None and item not in action.choices:
                parser.error(
                    f"{source}: {action.dest} {item!r}: {did_you_mean(item, action.choices)}expected one of "
                    f"{', '.join(map(str, action.choices))}"
                )


def _choices(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    return next(a.choices for a in parser._actions if a.dest == dest)
