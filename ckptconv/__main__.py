"""The ``ckptconv`` command's start (and ``python -m ckptconv``): allocator
settings, quiet signals, then `ckptconv.cli`.

This module imports nothing heavy, so the process is cheap to re-execute and a
Ctrl-C or SIGTERM while ckptconv's modules load (about a second) ends it with
one line and the usual status (130 / 143), never a traceback from inside an
import. Once the command runs, SIGINT raises ``KeyboardInterrupt`` and SIGTERM
raises `ckptconv.errors.Terminated`, so every ``finally`` runs: temporary output is removed,
and the CLI reports the interrupt and exits 130 / 143.
"""

from __future__ import annotations

import os
import signal
import sys

# ckptconv.errors, not a class of this module: run as ``python -m ckptconv``,
# this file is ``__main__``, and the CLI would catch another class of that name.
from ckptconv.errors import Terminated

#: glibc malloc settings for the ckptconv process. Moving and decoding chunks
#: passes hundreds of megabytes through short-lived buffers; by default glibc
#: serves each from a fresh mmap whose pages the kernel faults in and zeroes
#: one 4 KiB page at a time. Serving them from the heap, in huge pages where
#: the kernel allows (THP "madvise"), cut a 1.6 GB to-scan from 2.1 s to 1.3 s
#: and a one-chunk to-loop from 7.4 s to 4.8 s here, at the same peak memory.
#: One arena for all threads (``arena_max=1``): with an arena per thread, as
#: glibc gives TensorStore's and the decode workers' threads, each arena keeps
#: the buffers its threads freed and none can reuse another's, so the peak
#: grew with the run: a one-chunk to-loop of 1.6 GB (48 layers) peaked at
#: 660-790 MB, and at 830-890 MB at 96 layers; with one arena 405-427 MB and
#: 425 MB, at the same wall (to the load's noise, ``/usr/bin/time -v``).
GLIBC_TUNABLES = (
    "glibc.malloc.hugetlb=1"
    ":glibc.malloc.mmap_threshold=4294967296"
    ":glibc.malloc.trim_threshold=4294967296"
    ":glibc.malloc.arena_max=1"
)


def _quit_starting(signum: int, frame: object) -> None:
    # Nothing has been written yet: leave at once, quietly.
    try:
        os.write(2, b"Error: interrupted while starting; nothing was written.\n")
    finally:
        os._exit(128 + signum)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _main(main: object) -> int:
    """click's standalone handling, except for a Ctrl-C that lands outside a
    command's own work (click's argument parsing, or after the command
    finished): click would print "Aborted!" and exit 1; here it is the usual
    one line and 130 (143). Inside the work, the CLI reports it itself."""
    import click

    try:
        code = main.main(prog_name="ckptconv", standalone_mode=False)
    except click.exceptions.Abort as e:
        sig = 143 if isinstance(e.__context__, Terminated) else 130
        from ckptconv import errors

        # The command's work may have ended (OUT renamed into place) with the
        # signal landing in the moment after, before click returned: say so,
        # as the CLI does inside the work (a CI run once saw plain
        # "interrupted." here with a complete OUT on disk).
        message = errors.completed_message() or "interrupted."
        os.write(2, f"Error: {message}\n".encode())
        return sig
    except click.UsageError as e:
        # One line, as every error (click's own shows usage, a hint, a blank line).
        cmd = e.ctx.command_path if e.ctx is not None else "ckptconv"
        click.echo(f"Error: {e.format_message()} (see '{cmd} --help')", err=True)
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return code if isinstance(code, int) else 0


def run() -> None:
    """The console script: `ckptconv.cli.main` under `GLIBC_TUNABLES`.

    Tunables are read when a process starts, so the first start re-executes
    itself once with them set. A ``GLIBC_TUNABLES`` already in the environment
    (yours, or the re-executed one) is left alone; other C libraries ignore it.
    """
    quiet = {signal.SIGINT, signal.SIGTERM}
    signal.signal(signal.SIGINT, _quit_starting)
    signal.signal(signal.SIGTERM, _quit_starting)
    # A signal that arrived while the re-executed process was still starting
    # (blocked across exec, see below) is delivered here, to the quiet handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, quiet)
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
        argv = [sys.executable, "-m", "ckptconv", *sys.argv[1:]]
        # Handlers do not survive exec but the signal mask does: blocked, a
        # Ctrl-C during the new interpreter's start waits for its handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, quiet)
        try:
            os.execve(sys.executable, argv, env)
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, quiet)  # run as we are
    from ckptconv.cli import main

    # Python's own SIGINT handler, not a wrapper: asyncio.Runner takes over
    # SIGINT (cancelling its main task cleanly) only from that one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(_main(main))
    finally:
        # The command is over (OUT is in place, or the error is printed). The
        # interpreter's shutdown puts the default handlers back, and a signal
        # then (taken by any thread: numpy's BLAS threads do not block it)
        # would kill a complete run (status -2, no message). Ignored, it is
        # dropped: shutdown leaves an ignored signal ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    run()
