"""Files that appear whole or not at all: written under a temporary name beside their place, then renamed."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from project.infra.errors import UserError


def write_file(path: Path, write: Callable[[Path], Any], flag: str = "", reads: Sequence[Path] = ()) -> None:
    """`write(temporary path)`, then rename it onto `path`: a crash or a full disk leaves the old file or none, never
    half of one, and two processes writing one file at once each leave a whole one (their temporary names differ). The
    temporary name keeps the suffix (matplotlib and the exporters go by it) and fits where the name fits (255 bytes). An
    OSError becomes one line naming the file, after the option that named it (`flag`, e.g. "--output: "). A path the
    user named (a `flag`) is written as a shell writes it: through a link, and into a device or FIFO in place (a rename
    would replace the link or /dev/null itself); a run's own files never follow a link. A file the command `reads` (a
    folder: any file in it) is never written over."""
    partial = path
    try:
        if path.is_dir() or not path.name:  # "", ".", "/": no name to write
            raise UserError(f"{flag}{path} is a folder; name the file to write")
        partial = path.with_name(f".{path.stem[:64]}.partial-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
        if flag and same_file(path, sys.stdout):  # a rename would put the file where the shell's redirection is not
            raise UserError(f"{flag}{path} is this command's standard output: name a file (predict: --output -)")
        for source in reads:
            if source.is_dir() and path.resolve().is_relative_to(source.resolve()) or is_same(path, source):
                raise UserError(f"{flag}{path} is what this command reads ({source}); name another file")
        if flag and in_place(path):
            partial = path
        elif flag and path.is_symlink():
            path = Path(os.path.realpath(path))  # its target may not exist yet
            if path.is_symlink():  # a loop of links, which a shell refuses too
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            partial = path.with_name(partial.name)
        if path.is_dir():
            raise UserError(f"{flag}{path} is a folder; name the file to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        if partial != path and partial.exists():  # a writer may have had nothing to write
            os.replace(partial, path)
    except OSError as error:
        raise UserError(f"{flag}cannot write {path}: {error.strerror or error}") from error
    finally:
        if partial != path:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)


def in_place(path: Path) -> bool:
    """Whether a shell would write into `path` rather than replace it: a device, a FIFO or a socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there (or not reachable: write_file says why)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def is_same(path: Path, other: Path) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:  # either is not there
        return False


def same_file(path: Path, stream: Any) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(stream.fileno()))
    except (OSError, ValueError, AttributeError):  # not there, or a stream with no descriptor
        return False


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda partial: partial.write_text(text))
