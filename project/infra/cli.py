"""The command line's building blocks: value types, a parser whose mistakes are short, and YAML config files read by
that same parser (so a value is checked in one place, whether it comes from a flag or a file). No torch here:
`--help` and typos must answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import re
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from project.infra.errors import UserError
from project.infra.redact import redact_text

# A config file holds option: value lines (a run's config.yaml is about 1 kB); a bigger or deeper one is refused
# before PyYAML builds it, and so are aliases, which let a few hundred bytes expand to gigabytes.
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 2  # a mapping of option: value or option: [values]
FLOAT32_MAX = 3.4028234663852886e38


def checked(description: str, convert: Callable[[str], Any], ok: Callable[[Any], Any] = lambda _: True) -> Any:
    """An argparse type: `convert(text)`, refused unless `ok` of it; argparse's error names it by `description`."""

    def parse(text: str) -> Any:
        value = convert(text)
        if not ok(value):
            raise ValueError
        return value

    parse.__name__ = description
    return parse


positive_int = checked("positive integer", int, lambda value: value > 0)
non_negative_int = checked("non-negative integer", int, lambda value: value >= 0)
seed = checked("seed (an integer from 0 to 2**32 - 1)", int, lambda value: 0 <= value < 2**32)  # numpy's are 32-bit
# torch computes in float32: a larger number is infinite there
positive_float = checked("positive number (below 3.4e38)", float, lambda value: 0 < value <= FLOAT32_MAX)
# Adam's first step is the learning rate / (1 - beta1), 10x it: a larger one overflows float32 there
learning_rate = checked("learning rate (a positive number below 3.4e37)", float,
                        lambda value: 0 < value <= FLOAT32_MAX / 10)  # fmt: skip
# Augmentation pads by up to 4 pixels, reflecting the image: that needs more than 4 on each side.
image_size = checked("image size (5 pixels or more)", int, lambda value: value >= 5)
# "" would be the working directory, unasked; "~user/..." must name a user this machine knows (a home to expand).
path = checked("path (not empty; ~ and ~user: a known home)", str,
               lambda text: text and not (text.startswith("~") and os.path.expanduser(text) == text))  # fmt: skip
fraction = checked("fraction (between 0 and 1)", float, lambda value: 0 < value < 1)
# A name stays one folder inside --exp-dir: no separators, no '..', nothing hidden.
name = checked("name (letters, digits, '_', '-', '.'; no '/' or '..')", str,
               lambda text: re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", text) and ".." not in text)  # fmt: skip
# Which metrics a task logs is checked once its data is known.
monitor = checked("metric (train/NAME or val/NAME)", str, lambda text: re.fullmatch(r"(train|val)/[A-Za-z0-9_]+", text))
# A key every tracker accepts: letters, digits, '_', '-', '.', '/'.
tag = checked("name=value tag", str, lambda text: re.fullmatch(r"[A-Za-z0-9_.\-/]{1,250}=.*", text))
# `auto`, a count (`2`), or device indices (`0,1`), as Lightning's Trainer takes them.
devices = checked("device count ('auto', a positive count, or indices like 0,1)",
                  lambda t: t if t == "auto" or re.fullmatch(r"\d+(,\d+)+,?", t) else positive_int(t))  # fmt: skip


def tracker(text: str) -> str:
    if text == "neptune":  # the original template's tracker: say where it went rather than "invalid choice"
        raise argparse.ArgumentTypeError("neptune.ai ended its service in March 2026 and Lightning 2.6.4 removed "
                                         "NeptuneLogger; use --logger mlflow (the default): neptune-exporter moves "
                                         "runs you exported from Neptune into MLflow")  # fmt: skip
    return text


class Repeatable(argparse.Action):
    """`--logger a --logger b` gives [a, b]; the first use replaces the default (or a config file's list)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


class Parser(argparse.ArgumentParser):
    """argparse with the options declared once through `add`, which also knows how a config file spells them;
    a mistake is at most three lines (no 30-line usage), and a mistyped option names the closest one."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("usage", f"{kwargs['prog']} [options]  (see --help)")
        super().__init__(allow_abbrev=False, **kwargs)
        self.flags: dict[str, str] = {}  # dest -> its flag, for config files and suggestions
        self.switches: set[str] = set()  # dests of on/off flags
        self.repeatable: set[str] = set()  # dests that take a list, a flag for each value
        self.lists: set[str] = set()  # dests that take a list after one flag (nargs: --widths 64 32)
        self.command_only: set[str] = set()  # what to do with a run (--resume, ...), never in a config file
        self.source = ""  # set while a config file is read, to say where a mistake came from

    def add(self, flag: str, *, default: Any = None, help: str, command_only: bool = False, **kwargs: Any) -> None:
        dest = flag[2:].replace("-", "_")
        if command_only:
            self.command_only.add(dest)
        if kwargs.get("action") == "store_true":
            self.switches.add(dest)
            if not command_only:  # --x and --no-x, so that a flag can undo a config file's `true`
                kwargs["action"] = argparse.BooleanOptionalAction
            default = bool(default)
        elif kwargs.get("action") is Repeatable:
            self.repeatable.add(dest)
            help += f" (default: {' '.join(map(str, default))})" if default else ""
        elif default not in (None, [], ()):
            help += " (default: %(default)s)"
        if kwargs.get("nargs") not in (None, "?"):
            self.lists.add(dest)
        self.add_argument(flag, default=default, help=help, **kwargs)
        self.flags[dest] = flag

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """Refuses a value this locale cannot write (a file name, a record, a printed line) before anything uses it."""
        args = list(sys.argv[1:] if args is None else args)
        encoding = sys.getfilesystemencoding()
        for previous, arg in itertools.pairwise(["argument", *args]):
            try:
                arg.encode(encoding)
            except UnicodeEncodeError:
                # the option, or the one whose value it is; a name given on its own (project.predict's inputs)
                takes_value = previous.startswith("-") and "=" not in previous and not self.is_switch(previous)
                option = arg.partition("=")[0] if arg.startswith("-") else previous if takes_value else ascii(arg)
                utf8 = encoding.lower().replace("-", "") == "utf8"  # then it is a name in another encoding
                advice = "rename it in UTF-8" if utf8 else "use a UTF-8 locale (e.g. LC_ALL=C.UTF-8)"
                self.error(f"{option}: not text in this locale's encoding ({encoding}); {advice}")
        return super().parse_known_args(args, namespace)

    def is_switch(self, flag: str) -> bool:
        dest = flag.removeprefix("--no-").removeprefix("--").replace("-", "_")
        return dest in self.switches or flag in ("-h", "--help")

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (-[^\s=]+)", message)
        if unknown:
            close = difflib.get_close_matches(unknown.group(1), self.flags.values(), n=1, cutoff=0.6)
            message = f"unknown option {unknown.group(1)}" + (f"; did you mean {close[0]}?" if close else "")
        # A rejected value may be a secret: never echo one.
        print(f"usage: {self.usage}\n{self.prog}: error: {redact_text(self.source + message)}", file=sys.stderr)
        raise SystemExit(2)

    def read_config(self, path: Path) -> dict[str, Any]:
        """The values of a YAML config file (`learning_rate: 0.01` or `learning-rate: 0.01`), converted and checked
        by this parser exactly as the same flags would be; usable as defaults under the command line's flags."""
        self.source = f"--config {path}: "  # a mistake says where it came from
        try:
            values = load_config(path, as_written=True)
            options = [dest for dest in self.flags if dest not in self.command_only]
            tokens, seen = [], set()
            for key, value in values.items():
                dest = str(key).replace("-", "_")
                if dest in seen:
                    raise ValueError(f"'{key}' is given twice ('-' and '_' name the same option)")
                seen.add(dest)
                if dest in self.command_only:
                    raise ValueError(f"'{key}' is given on the command line only ({self.flags[dest]})")
                if dest not in self.flags:
                    close = difflib.get_close_matches(dest, options, n=1, cutoff=0.6)
                    raise ValueError(f"unknown option '{key}'" + (f"; did you mean {close[0]}?" if close else ""))
                if dest in self.switches and not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
                if dest not in self.switches | self.lists and (isinstance(value, bool) or value == []):
                    raise ValueError(f"{key} takes a value, not {str(value).lower()}")
                if isinstance(value, dict) or (isinstance(value, list) and dest not in self.repeatable | self.lists):
                    raise ValueError(f"{key} takes one value" + (" or a list" if dest in self.repeatable else ""))
                if dest in self.lists:  # as the command line gives it: the flag, then its values
                    if value is not None:
                        tokens += [self.flags[dest], *map(str, value if isinstance(value, list) else [value])]
                    continue
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bool):
                        tokens.append(self.flags[dest] if item else f"--no-{self.flags[dest][2:]}")
                    elif item is not None:
                        tokens += [self.flags[dest], str(item)]
            parsed = vars(self.parse_args(tokens))
        except ValueError as error:
            self.error(str(error))
        finally:
            self.source = ""
        return {dest: parsed[dest] for dest in (str(key).replace("-", "_") for key in values)}


def load_config(path: Path, as_written: bool = False) -> dict[Any, Any]:
    """A config file's mapping, or a one-line ValueError, before PyYAML builds anything big. `as_written`: numbers
    as the file spells them, for the parser to read as it reads flags (YAML 1.1 reads `0123` as 83, `1:30` as 90)."""
    import yaml

    try:
        # Opened without waiting: a named pipe that nothing writes to reads as empty instead of blocking for good
        # (`--config <(...)` and a pipe on /dev/stdin have their writer and read as usual).
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(descriptor, True)
        with open(descriptor, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
            if not data and stat.S_ISFIFO(os.fstat(descriptor).st_mode):
                raise ValueError("cannot read it: a pipe that nothing writes to")
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file holds option: value lines")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read it: {getattr(error, 'strerror', None) or 'not UTF-8 text'}") from None
    try:
        depth, nodes, keys = 0, 0, set()  # the top mapping's nodes alternate key, value
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is built yet
            if isinstance(event, yaml.AliasEvent):
                raise ValueError("YAML aliases (*name) are not allowed in a config file")
            if depth == 1 and isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                key = getattr(event, "value", None) if nodes % 2 == 0 else None  # a key, or else a value
                if key is not None and key in keys:
                    raise ValueError(f"'{key}' is given twice")  # YAML would keep the last, silently
                keys.add(key)
                nodes += 1
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_CONFIG_DEPTH:
                raise ValueError("nested too deeply: a config file holds option: value or option: [values]")
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise ValueError("not valid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None
    if not isinstance(values, (dict, type(None))):
        raise ValueError("must hold a mapping of option: value")
    values = values or {}
    if as_written and values:
        written = {str(key): text for key, text in yaml.load(text, Loader=yaml.BaseLoader).items()}  # scalars as text
        values = {key: spelled(value, written.get(str(key))) for key, value in values.items()}
    return values


def spelled(value: Any, text: Any) -> Any:
    """A number as the file spells it (`text`, from YAML's BaseLoader); anything else as YAML read it."""
    if isinstance(value, list) and isinstance(text, list) and len(value) == len(text):
        return [spelled(*pair) for pair in zip(value, text, strict=True)]
    return text if type(value) in (int, float) and isinstance(text, str) else value


def add_model_options(parser: Parser, formats: str) -> None:
    """The options project.predict and project.export share: which trained model, and how to report mistakes."""
    parser.add(
        "--checkpoint", type=path, default="best", help=f"{formats}, or best/last of the latest run of --exp-name"
    )
    parser.add("--exp-dir", type=path, default="~/Experiments", help="where runs are, for --checkpoint best/last")
    parser.add("--exp-name", type=name, default="debug", help="whose latest run --checkpoint best/last means")
    parser.add("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def require_one_device(base: argparse.Namespace, command: str, advice: str = "") -> None:
    """project.sweep and project.seeds run one training after another in this process; several processes (DDP) would
    each run the whole loop, and part ways between its runs."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if base.gpus not in (None, 0, 1) or str(base.devices) != "1" or base.num_nodes != 1 or launched:
        raise UserError(f"{command} trains each run on one device{'; ' + advice if advice else ''}")


def refused_continuing(argv: list[str], command: str) -> bool:
    """project.sweep and project.seeds train each run afresh: --resume and --only-test are refused (in one line) before
    project.run's parser would go looking for the run they name."""
    if not any(arg.split("=")[0] in ("--only-test", "--resume") for arg in argv):
        return False
    print(f"error: --only-test and --resume are not {command} options: each run trains afresh", file=sys.stderr)
    return True
