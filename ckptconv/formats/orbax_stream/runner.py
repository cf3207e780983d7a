"""Running the package's async code for sync callers: `_run` (from inside a
running event loop too), `_run_here` (SIGTERM turned into a cancellation of
the main task, so that every clean-up runs), and `_settle` / `_await` for the
futures of TensorStore's commits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
from typing import Any

from ckptconv.errors import Terminated


async def _settle(future: Any) -> None:
    """Wait for ``future`` to finish, whatever its outcome (clean-up paths)."""
    try:
        await asyncio.shield(future)
    except BaseException:  # its own failure, or this task cancelled again: done waiting
        pass


async def _gather(*aws: Any) -> list[Any]:
    """`asyncio.gather` that lets every awaitable finish before it raises the
    first error. Plain gather raises at once and leaves the others running:
    their TensorStore reads complete after the event loop closed, and each one's
    callback printed "RuntimeError: Event loop is closed" with a traceback
    after ckptconv's one-line error (a truncated data file: two of them)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


async def _await(future: Any) -> Any:
    return await future


def _run_here(coro: Any) -> Any:
    """`asyncio.run`, with SIGTERM (the CLI's handler raises `Terminated`)
    turned into a cancellation of the main task while the loop runs.

    A handler that raises lands wherever the loop happens to be: inside one
    task's step, that task ends with the exception while its siblings, the
    TensorStore futures they await and asyncio's clean-up are left to sort
    it out (seen: "Task exception was never retrieved" on stderr, and a
    process that hung instead of exiting 143). Cancelling the main task lets
    every ``finally`` and TensorStore future unwind in order, as asyncio's own
    SIGINT handling does; `Terminated` is raised once the loop has stopped.
    """
    terminated = False
    main: list[asyncio.Task] = []

    async def guarded() -> Any:
        main.append(asyncio.current_task())
        return await coro

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        if main:
            main[0].cancel()

    own = threading.current_thread() is threading.main_thread() and callable(
        signal.getsignal(signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM) if own else None
    with asyncio.Runner() as runner:
        if own:
            runner.get_loop().add_signal_handler(signal.SIGTERM, on_term)
        try:
            return runner.run(guarded())
        except asyncio.CancelledError:
            # Nothing here cancels the main task but SIGTERM (above) and
            # asyncio's own SIGINT handler; when Ctrl-C lands while tasks are
            # being cancelled, asyncio re-raises the CancelledError instead of
            # KeyboardInterrupt (asyncio.Runner checks task.uncancel() == 0).
            if terminated:
                raise Terminated() from None
            raise KeyboardInterrupt from None
        except KeyboardInterrupt:
            if terminated:
                raise Terminated() from None
            raise
        finally:
            if own:
                runner.get_loop().remove_signal_handler(signal.SIGTERM)
                signal.signal(signal.SIGTERM, previous)  # remove_ sets SIG_DFL


def _run(coro: Any) -> Any:
    """Runs a coroutine to completion, also from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(coro)
    # Called from async code (e.g. a notebook): use a private loop in a thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
