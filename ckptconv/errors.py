"""Errors raised by ckptconv. Every one is a `CkptconvError`."""

from __future__ import annotations


class CkptconvError(Exception):
    """Base of every error ckptconv raises on purpose.

    The message is complete on its own: what went wrong, where (file, leaf path,
    layer) and what to do next. The CLI prints it as ``Error: <message>``.
    """


class FormatError(CkptconvError, OSError):
    """A checkpoint could not be recognised or read."""


class GroupError(CkptconvError, ValueError):
    """Layers to stack or unstack are missing, misnumbered or inconsistent."""


class OutputExistsError(CkptconvError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class VerifyError(CkptconvError, ValueError):
    """verify could not run (bad model target, inputs or tolerances)."""


class NothingToConvertError(GroupError):
    """No layer group (to-scan) or stacked subtree (to-loop) was found."""
