"""The exception hierarchy: every error petlsearch raises on purpose derives from PetlsearchError."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PetlsearchError(Exception):
    """Root of petlsearch's errors; the CLI prints these as one line and exits with code 2."""


class BudgetError(PetlsearchError, ValueError):
    """A budget string that cannot be read, or a budget no candidate fits."""


class PluginError(PetlsearchError):
    """A plugin that is unknown, malformed, or registered twice."""


class StructureError(PetlsearchError, ValueError):
    """A structure file that is malformed, or that does not fit the model it is applied to."""


class TaskError(PetlsearchError, ValueError):
    """A task or data source that cannot be loaded."""


class MissingDependencyError(PetlsearchError, ImportError):
    """An optional package is missing; the message holds the command that installs it."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choices to `name`, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
