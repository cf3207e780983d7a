"""Running a conversion as N processes of one ``jax.distributed`` program:
who they are (`Processes`), and how they wait for each other (`Processes.sync`).

JAX is imported only here, and only when more than one process is asked for
(or the caller's process already runs ``jax.distributed`` with several): a
one-process conversion of msgpack, safetensors or an Orbax clone never
imports it.

Coordination uses JAX's own runtime, not a scheduler of ckptconv's: the
coordination service's key-value store (``global_state.client``). A sync
point is a key per process (``ckptconv/<run>/<stage>/<i>``, its value a JSON
payload); a process that fails writes ``ckptconv/<run>/error/<i>`` instead,
so the others stop at their next sync point within a poll interval, naming
it, instead of waiting. A process that never arrives (killed) is named once
the timeout passes (``CKPTCONV_BARRIER_TIMEOUT`` seconds, default 300):
JAX's own heartbeat would abort the survivors only after 100 s, without a
word about which process went missing. ``wait_at_barrier`` is not used
because it cannot carry an error: a failed peer would look like a slow one
until the timeout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ckptconv.errors import CkptconvError

#: Seconds a process waits at a sync point for the others (env, for tests and slow filesystems).
TIMEOUT_ENV = "CKPTCONV_BARRIER_TIMEOUT"
#: Test hook: seconds a process sleeps after writing its database, before it says so.
PAUSE_ENV = "CKPTCONV_MULTIHOST_PAUSE"
_POLL_S = 0.1

_runs = 0  # conversions run in this process: every process counts the same


def options_from_env(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int | None, int | None]:
    """The flags, each defaulting to its environment variable
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``):
    ``jax.distributed.initialize()`` itself reads only the first."""
    def number(name: str) -> int | None:
        value = os.environ.get(name)
        if value in (None, ""):
            return None
        try:
            return int(value)
        except ValueError:
            raise CkptconvError(f"{name}={value!r} is not a number") from None

    if coordinator is None:
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = number("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = number("JAX_PROCESS_ID")
    return coordinator, num_processes, process_id


def check_options(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """True when the options ask for several processes; errors for options
    that do not fit together (before anything is imported or read)."""
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise CkptconvError(
                f"--process-id {process_id} needs --num-processes (the number of processes, "
                "more than the largest id)"
            )
        return False
    if num_processes < 1:
        raise CkptconvError(f"--num-processes {num_processes}: give 1 or more")
    if not coordinator:
        raise CkptconvError(
            f"--num-processes {num_processes} needs --coordinator HOST:PORT (or "
            "JAX_COORDINATOR_ADDRESS): process 0's address, the same for every process"
        )
    if process_id is None:
        raise CkptconvError(
            f"--num-processes {num_processes} needs --process-id (or JAX_PROCESS_ID): "
            f"0 … {num_processes - 1}, a different one for each process"
        )
    if not 0 <= process_id < num_processes:
        raise CkptconvError(
            f"--process-id {process_id} is out of range for --num-processes {num_processes}: "
            f"give 0 … {num_processes - 1}"
        )
    return True


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "300")
    try:
        return float(value)
    except ValueError:
        raise CkptconvError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


@dataclass
class Processes:
    """This process's place in a multi-process conversion."""

    process_id: int
    num_processes: int
    client: Any
    timeout: float
    run: int
    _stages: list[str] = field(default_factory=list)
    _failed: bool = False

    def sync(self, stage: str, payload: Any = None) -> list[Any]:
        """Waits until every process has reached ``stage``; returns their
        payloads by process id. Raises `CkptconvError` naming a process that
        failed, or that did not arrive within the timeout."""
        prefix = f"ckptconv/{self.run}"
        # A stage reached again (one "written" per item of a step) is a new
        # sync point: its keys must not be the last one's.
        seen = self._stages.count(stage)
        self._stages.append(stage)
        if seen:
            stage = f"{stage}.{seen}"
        self.client.key_value_set(f"{prefix}/{stage}/{self.process_id}", json.dumps(payload))
        deadline = time.monotonic() + self.timeout
        while True:
            self._check_errors(stage)
            try:
                got = dict(self.client.key_value_dir_get(f"{prefix}/{stage}/"))
            except Exception as e:
                raise CkptconvError(
                    f"process {self.process_id}: lost the coordinator (process 0) while waiting "
                    f"for the others to finish {stage!r}: {e}. Nothing was committed."
                ) from None
            by_id = {int(k.rsplit("/", 1)[1]): v for k, v in got.items()}
            if len(by_id) >= self.num_processes:
                return [json.loads(by_id[i]) for i in range(self.num_processes)]
            if time.monotonic() > deadline:
                missing = [i for i in range(self.num_processes) if i not in by_id]
                names = ", ".join(str(i) for i in missing)
                raise CkptconvError(
                    f"{'processes' if len(missing) > 1 else 'process'} {names} did not finish {stage!r} "
                    f"within {self.timeout:g} s (killed, or stuck; {TIMEOUT_ENV} sets the wait): "
                    "stopping; nothing was committed."
                )
            time.sleep(_POLL_S)

    def _check_errors(self, stage: str) -> None:
        try:
            errors = self.client.key_value_dir_get(f"ckptconv/{self.run}/error/")
        except Exception:
            return  # the stage read that follows says it
        for key, message in sorted(errors):
            who = int(key.rsplit("/", 1)[1])
            if who != self.process_id:
                raise CkptconvError(f"process {who} failed: {message}")

    def fail(self, message: str) -> None:
        """Tells the others that this process failed (they stop at their next
        sync point, naming it); best effort."""
        if self._failed:
            return
        self._failed = True
        try:
            self.client.key_value_set(f"ckptconv/{self.run}/error/{self.process_id}", message)
        except Exception:
            pass
        if self.process_id == 0:
            # Process 0 holds the coordination service: leave the others a
            # moment to read the error before the service goes with it.
            time.sleep(min(2.0, self.timeout))

    def pause_for_tests(self) -> None:
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause and self.process_id != 0:
            time.sleep(pause)


def _make(jax_mod: Any) -> Processes | None:
    from jax._src.distributed import global_state

    if global_state.client is None or jax_mod.process_count() <= 1:
        return None
    global _runs
    _runs += 1
    return Processes(jax_mod.process_index(), jax_mod.process_count(), global_state.client,
                     _timeout(), _runs)


def current() -> Processes | None:
    """The caller's ``jax.distributed`` program, when it runs one of several
    processes; None otherwise (JAX is not imported for the question)."""
    jax_mod = sys.modules.get("jax")
    if jax_mod is None:
        return None
    try:
        return _make(jax_mod)
    except Exception:
        return None


def start(coordinator: str | None, num_processes: int | None, process_id: int | None) -> Processes | None:
    """Joins (or starts) the ``jax.distributed`` program these options name;
    None for a single process. Reuses one the caller already initialized."""
    coordinator, num_processes, process_id = options_from_env(coordinator, num_processes, process_id)
    if not check_options(coordinator, num_processes, process_id):
        return current()
    import jax
    from jax._src.distributed import global_state

    if global_state.client is None:
        timeout = max(1, int(_timeout()))
        try:
            jax.distributed.initialize(
                coordinator, num_processes=num_processes, process_id=process_id,
                initialization_timeout=timeout,
            )
        except Exception as e:
            raise CkptconvError(
                f"process {process_id}: cannot join the {num_processes}-process program at "
                f"{coordinator}: {e}"
            ) from None
    got = _make(jax)
    if got is None or (got.num_processes, got.process_id) != (num_processes, process_id):
        raise CkptconvError(
            f"jax.distributed already runs as process {jax.process_index()} of "
            f"{jax.process_count()}, not {process_id} of {num_processes}"
        )
    return got


def assign(units: list[tuple[str, int]], n: int) -> dict[str, int]:
    """Which process writes each unit (a name and its bytes): the largest
    first, each to the process with the fewest bytes so far (the lowest id on
    a tie). It depends only on the names and sizes, which every process reads
    from the same metadata, so all compute the same assignment unasked."""
    loads = [0] * n
    owner: dict[str, int] = {}
    for name, nbytes in sorted(units, key=lambda u: (-u[1], u[0])):
        i = min(range(n), key=lambda p: (loads[p], p))
        owner[name] = i
        loads[i] += nbytes
    return owner
