"""What must never be written down: the values of secrets.

Anything whose name says KEY, TOKEN, SECRET, PASSWORD or CREDENTIAL is a secret, whether it is an
environment variable, a config entry, a `--tag`, or a flag on the command line; so is the password in
a URL (`https://user:password@host`). Every record of a run (config.yaml, manifest.json, the tracker's
params and tags) and every line a command prints about its input passes through here first, in whatever form the
secret came: `--api-key X`, `--api-key=X`, `--tag db_token=X`, `--tag=db_token=X`, `DB_TOKEN=X`, or X itself when an
environment variable with a secret's name holds it. Lightweight on purpose: no torch, no tracker imports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
# Shorter values ("1", "true") are not secrets, and scrubbing them would mangle ordinary text.
MIN_SECRET_LENGTH = 6


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values() -> list[str]:
    """Values of the secret-named environment variables, longest first (so no secret is half-scrubbed)."""
    values = {v for k, v in os.environ.items() if is_secret(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` without the password of any URL in it and without the value of any secret in the environment."""
    text = URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact(value: Any, name: str = "") -> Any:
    """A copy of `value` (a mapping, list or scalar named `name`) that is safe to write down."""
    if name and is_secret(name) and value is not None:
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _redact_assignment(scrub(value))
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """A command line that is safe to write down: `--api-key X`, `--api-key=X`, `--tag NAME_TOKEN=X`,
    `--tag=NAME_TOKEN=X` and `NAME_TOKEN=X` lose X."""
    safe: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            safe.append(REDACTED)
            hide_next = False
            continue
        flag, equals, value = arg.partition("=")
        if arg.startswith("-") and is_secret(flag):
            safe.append(f"{flag}={REDACTED}" if equals else arg)
            hide_next = not equals
        elif arg.startswith("-") and equals:
            safe.append(f"{flag}={_redact_assignment(scrub(value))}")
        else:
            safe.append(_redact_assignment(scrub(arg)))
    return safe


SECRET_ASSIGNMENT = re.compile(r"([\w.\-/]*(?:KEY|TOKEN|SECRET|PASSW(?:OR)?D|CREDENTIAL)[\w.\-/]*)=([^\s'\",]+)", re.I)


def redact_text(text: str) -> str:
    """A line of text (an error message that quotes the command line) with every secret in it hidden."""
    return SECRET_ASSIGNMENT.sub(rf"\1={REDACTED}", scrub(text))


def _redact_assignment(text: str) -> str:
    """`NAME=value` (a --tag, an environment assignment) with a secret NAME keeps only the name."""
    name, equals, _ = text.partition("=")
    if equals and re.fullmatch(r"[\w.\-/]+", name) and is_secret(name):
        return f"{name}={REDACTED}"
    return text
