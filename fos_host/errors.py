"""Exceptions with messages a user can act on.

Every error that reaches the command line is a `FosError`: its message is one line, and
`exit_code` is what the command exits with (2 for a bad flag, policy file or missing kernel
feature, as the CLI contract says).
"""

from __future__ import annotations

import errno as _errno
import os


class FosError(Exception):
    """Base class: the message is shown to the user as it is."""

    exit_code = 1


class ConfigError(FosError):
    """A bad flag, an unreadable or malformed policy/profile file, a missing kernel feature."""

    exit_code = 2


class StepError(FosError):
    """A step of a sandbox set-up failed; names the step and the errno."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        self.step = step
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        text = f"{step}: {name} ({os.strerror(err)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)
