"""What must never be written down or printed: a secret. A name with KEY, TOKEN, SECRET, PASSWORD or CREDENTIAL
names one (an environment variable, a config entry, a `--tag`, an option, `name=X` or `name: X` inside a value), and so
does a URL's password; a number is none. Every record of a run and every line about its input passes through
`redact_text`. No torch.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW(?:OR)?D|CREDENTIAL", re.IGNORECASE)
# NAME=value, NAME = value, NAME: value (in a store's URL '=' and ':' are escaped as %3D and %3A). Before a ':' the
# name ends with the secret's word (api_key: X, tokens: X): a path before one (.../keypoints/a.yaml: no such option) is
# a file's name in a message.
SECRET_ASSIGNED = re.compile(rf"[\w.\-/]*(?:{SECRET_NAME.pattern})[\w.\-/]*(?:\s*=|%3D)\s*|"
                             rf"[\w\-]*(?:{SECRET_NAME.pattern})S?(?:\s*:|%3A)\s*", re.IGNORECASE)  # fmt: skip
# Anywhere in a text: NAME='a b', or a value that ends at a space, quote, ',', ';', '&' (those it starts with are its
# own). A value redacted already (a folder: `password=[redacted]/run`) is left as it is, and the rest of the path too.
ASSIGNMENT = re.compile(
    rf"({SECRET_ASSIGNED.pattern})(?!\[redacted\](?:/|\s|$))('[^']*'|\"[^\"]*\"|['\",;&]*[^\s'\",;&]+)", re.IGNORECASE
)
# scheme://user:password@host, the user possibly empty (sqlite+pysqlcipher://:password@/runs.db); the password runs to
# the line's last '@' (SQLAlchemy and requests read it to the last; a '/', an '@' or a space in it as written, and a
# driver's message that quotes part of it after the URL).
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^\n]*@")
# Shorter environment values ("1", "true") are not secrets, and scrubbing them would mangle ordinary text.
MIN_SECRET_LENGTH = 6


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact_text(text: str) -> str:
    """`text` without URL passwords, secret-named values, or the value of any secret in the environment."""
    text = ASSIGNMENT.sub(rf"\1{REDACTED}", URL_PASSWORD.sub(rf"\1{REDACTED}@", text))
    values = {v for k, v in os.environ.items() if is_secret(k) and len(v) >= MIN_SECRET_LENGTH}
    for value in sorted(values, key=len, reverse=True):  # longest first, so that no secret is half-scrubbed
        text = text.replace(value, REDACTED)
    return text


def redact_path(path: str | os.PathLike) -> str:
    """A path, or a store's URL, with each folder's name redacted on its own: `.../password=X/run/last.ckpt` keeps
    `run/last.ckpt`, and a secret's value runs to the end of its name (`password=a b`)."""
    return redact_text("/".join(redact_whole(part) for part in os.fspath(path).split("/")))


def redact_whole(value: str) -> str:
    """`value` (one name, or one argument of a command line) with a secret-named assignment hidden to its end."""
    found = SECRET_ASSIGNED.search(value)
    return value[: found.end()] + REDACTED if found and value[found.end() :] not in ("", REDACTED) else value


def redact(value: Any, name: str = "") -> Any:
    """A copy of `value` (a mapping, list or scalar named `name`) that is safe to write down. A number is no secret:
    a model's `num_tokens: 4` or `key_dim: 64` stays readable (a run's config.yaml is read again to resume it)."""
    if name and is_secret(name) and value is not None and not isinstance(value, (bool, int, float)):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return redact_path(value) if isinstance(value, str) else value  # a value may be a path (--data-dir)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line that is safe to write down; the argument after a secret-named flag (`--api-key X`) is hidden."""
    pairs = itertools.pairwise(["", *argv])
    return [
        REDACTED if flag[:1] == "-" and "=" not in flag and is_secret(flag) else redact_text(redact_whole(arg))
        for flag, arg in pairs
    ]
