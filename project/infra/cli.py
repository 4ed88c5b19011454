"""The command line's building blocks: value types, a parser whose mistakes are short, and YAML config files read by
that same parser (so a value is checked in one place, whether it comes from a flag or a file). No torch here:
`--help` and typos must answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any, NoReturn


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:  # numpy's seeds are 32-bit
        raise ValueError
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError
    return value


def name(text: str) -> str:
    """A name that stays one folder inside --exp-dir: no separators, no '..', nothing hidden."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", text) or ".." in text:
        raise ValueError
    return text


def monitor(text: str) -> str:
    """train/<metric> or val/<metric>; which metrics a task logs is checked once its data is known."""
    if not re.fullmatch(r"(train|val)/[A-Za-z0-9_]+", text):
        raise ValueError
    return text


def tag(text: str) -> str:
    """KEY=VALUE, with a key every tracker accepts: letters, digits, '_', '-', '.', '/'."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,250}=.*", text):
        raise ValueError
    return text


NEPTUNE_GONE = (
    "neptune.ai ended its service in March 2026 and Lightning 2.6.4 removed NeptuneLogger; use --logger mlflow "
    "(the default): neptune-exporter moves runs you exported from Neptune into MLflow"
)


def tracker(text: str) -> str:
    if text == "neptune":  # the original template's tracker: say where it went rather than "invalid choice"
        raise argparse.ArgumentTypeError(NEPTUNE_GONE)
    return text


def devices(text: str) -> str | int:
    """`auto`, a count (`2`), or device indices (`0,1`), as Lightning's Trainer takes them."""
    if text == "auto" or re.fullmatch(r"\d+(,\d+)+,?", text):
        return text
    return positive_int(text)


for _type, _description in [
    (positive_int, "positive integer"),
    (non_negative_int, "non-negative integer"),
    (seed, "seed (an integer from 0 to 2**32 - 1)"),
    (positive_float, "positive number"),
    (fraction, "fraction (between 0 and 1)"),
    (name, "name (letters, digits, '_', '-', '.'; no '/' or '..')"),
    (monitor, "metric (train/NAME or val/NAME)"),
    (tag, "name=value tag"),
    (devices, "device count ('auto', a positive count, or indices like 0,1)"),
]:
    _type.__name__ = _description  # argparse names the type in its error message


class Repeatable(argparse.Action):
    """`--logger a --logger b` gives [a, b]; the first use replaces the default (or a config file's list)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


class Parser(argparse.ArgumentParser):
    """argparse with the options declared once through `add`, which also knows how a config file spells them;
    a mistake is at most three lines (no 30-line usage), and a mistyped option names the closest one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, usage=f"{kwargs['prog']} [options]  (see --help)", **kwargs)
        self.flags: dict[str, str] = {}  # dest -> its flag, for config files and suggestions
        self.switches: set[str] = set()  # dests of on/off flags
        self.command_only: set[str] = set()  # what to do with a run (--resume, ...), never in a config file
        self.source = ""  # set while a config file is parsed, to say where a bad value came from

    def add(self, flag: str, *, default: Any = None, help: str, command_only: bool = False, **kwargs: Any) -> None:
        dest = flag[2:].replace("-", "_")
        if command_only:
            self.command_only.add(dest)
        if kwargs.get("action") == "store_true":
            self.switches.add(dest)
            if not command_only:  # --x and --no-x, so that a flag can undo a config file's `true`
                kwargs["action"] = argparse.BooleanOptionalAction
            default = bool(default)
        elif isinstance(default, list) and default:
            help += f" (default: {' '.join(map(str, default))})"
        elif default not in (None, [], ()):
            help += " (default: %(default)s)"
        self.add_argument(flag, default=default, help=help, **kwargs)
        self.flags[dest] = flag

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (--?[\w-]+)", message)
        if unknown:
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], self.flags.values(), n=1, cutoff=0.6)
            message = f"unknown option {unknown.group(1)}" + (f"; did you mean {close[0]}?" if close else "")
        from project.infra.redact import redact_text  # a rejected value may be a secret: never echo one

        print(f"usage: {self.usage}\n{self.prog}: error: {redact_text(self.source + message)}", file=sys.stderr)
        raise SystemExit(2)

    def read_config(self, path: Path) -> dict[str, Any]:
        """The values of a YAML config file (`learning_rate: 0.01` or `learning-rate: 0.01`), converted and checked
        by this parser exactly as the same flags would be; usable as defaults under the command line's flags."""
        import yaml

        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            self.error(f"--config: cannot read {path}: {getattr(error, 'strerror', None) or 'not UTF-8 text'}")
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            self.error(f"--config: {path} is not valid YAML" + (f" at line {mark.line + 1}" if mark else ""))
        if values is None:
            return {}
        if not isinstance(values, dict):
            self.error(f"--config: {path} must hold a mapping of option: value")
        tokens = []
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in self.flags or dest in self.command_only:
                close = difflib.get_close_matches(dest, self.flags, n=1, cutoff=0.6)
                self.error(
                    f"--config: {path}: unknown option '{key}'" + (f"; did you mean {close[0]}?" if close else "")
                )
            if dest in self.switches and not isinstance(value, bool):
                self.error(f"--config: {path}: {key} must be true or false")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bool):
                    tokens.append(self.flags[dest] if item else f"--no-{self.flags[dest][2:]}")
                elif item is not None:
                    tokens += [self.flags[dest], str(item)]
        self.source = f"--config {path}: "
        try:
            parsed = vars(self.parse_args(tokens))
        finally:
            self.source = ""
        return {dest: parsed[dest] for dest in (str(key).replace("-", "_") for key in values)}


def add_model_options(parser: Parser, formats: str) -> None:
    """The options project.predict and project.export share: which trained model, and how to report mistakes."""
    parser.add("--checkpoint", default="best", help=f"{formats}, or best/last of the latest run of --exp-name")
    parser.add("--exp-dir", default="~/Experiments", help="where runs are, for --checkpoint best/last")
    parser.add("--exp-name", type=name, default="debug", help="whose latest run --checkpoint best/last means")
    parser.add("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def refused_continuing(argv: list[str], command: str) -> bool:
    """project.sweep and project.seeds train each run afresh: --resume and --only-test are refused (in one line) before
    project.run's parser would go looking for the run they name."""
    if not any(arg.split("=")[0] in ("--only-test", "--resume") for arg in argv):
        return False
    print(f"error: --only-test and --resume are not {command} options: each run trains afresh", file=sys.stderr)
    return True
