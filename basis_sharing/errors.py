"""Errors a user can act on.

Every exception here carries a message that says what was wrong and what to do. `run.py` prints it
without a stack trace; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input or a missing resource: the message tells the user how to fix it."""


class ConfigError(UserError):
    """A configuration value is invalid: unknown name, out-of-range value, inconsistent settings."""


class DataNotFoundError(UserError):
    """A dataset file is neither in the local mirror nor reachable on the hub."""


class HubUnreachableError(UserError):
    """The Hugging Face hub cannot be reached and no local copy was found."""


class CalibrationError(UserError):
    """The calibration request cannot be satisfied by the chosen split."""


class BadDataError(UserError):
    """A data file (or hub split) is there but unusable: empty, undecodable or malformed rows."""


def unknown_choice(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """Build the standard "unknown X" error: every valid choice, and the nearest one to a typo."""
    choices = ", ".join(sorted(valid))
    message = f"Unknown {kind} '{name}'. Valid choices: {choices}."
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    if close:
        message += f" Did you mean '{close[0]}'?"
    return ConfigError(message)
