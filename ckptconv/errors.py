"""Errors raised by ckptconv. Every one is a `CkptconvError`."""

from __future__ import annotations

import re


class CkptconvError(Exception):
    """Base of every error ckptconv raises on purpose.

    The message is complete on its own: what went wrong, where (file, leaf path,
    layer) and what to do next. The CLI prints it as ``Error: <message>``.
    """


class FormatError(CkptconvError, OSError):
    """A checkpoint could not be recognised or read."""

    def __init__(self, message: str) -> None:
        # TensorStore appends its whole JSON spec to every error; the reason
        # before it is what a user needs.
        super().__init__(re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", message, flags=re.S))

    def __str__(self) -> str:
        return str(self.args[0])


class GroupError(CkptconvError, ValueError):
    """Layers to stack or unstack are missing, misnumbered or inconsistent."""


class OutputExistsError(CkptconvError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class VerifyError(CkptconvError, ValueError):
    """verify could not run (bad model target, inputs or tolerances)."""


class NothingToConvertError(GroupError):
    """No layer group (to-scan) or stacked subtree (to-loop) was found."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command ran. A ``KeyboardInterrupt``, so every
    ``finally`` (temporary output removal) runs, and so that asyncio passes it
    on: an event loop re-raises only ``KeyboardInterrupt`` and ``SystemExit``
    from a callback the signal interrupted, and logs and swallows anything
    else (a ``BaseException`` here let a SIGTERM'd conversion finish and exit
    0, about one run in a few hundred). Not a `CkptconvError`, since it is no
    error in the input."""


#: The outputs this process has put in place, complete (`convert._atomic_output`):
#: an interrupt after that says so instead of "nothing was written".
completed: list = []


def completed_message() -> str | None:
    """What an interrupt after `completed`'s last output says, if there is one."""
    if not completed:
        return None
    return (f"interrupted after {completed[-1]} was written: it is complete and in place, and "
            "the input is unchanged.")
