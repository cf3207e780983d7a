"""OUT written so that a half-written one never appears: a temporary directory
beside a local OUT, renamed into place (`_atomic_output`, a killed run's
leftovers removed); a bucket OUT written in place with its commit markers last
and deleted on failure (`_bucket_output`, `_commit_bucket`); `check_output`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ckptconv import errors, storage
from ckptconv.errors import (
    CkptconvError,
    FormatError,
    OutputExistsError,
)
from ckptconv.formats.layout import Layout


def check_output(dst: Path, force: bool) -> None:
    """Raise unless ``dst`` may be written: its folder exists, and ``dst`` does
    not (or ``force``). A bucket prefix has no folder; no object may be
    stored under it, ``force`` or not: without a rename an old output could
    only be deleted before the new one is complete."""
    if storage.is_bucket(dst):
        if dst.exists():
            raise OutputExistsError(
                f"{dst}: output already exists (objects are stored under this prefix); choose "
                "another path, or delete them first (gcloud storage rm -r / aws s3 rm "
                "--recursive). A bucket has no rename, so --force cannot replace an output "
                "atomically and does not apply to buckets. (Objects without a "
                "commit_success.txt are what a killed run left: no reader takes them for a "
                "checkpoint, and they are safe to delete.)"
            )
        return
    if not dst.absolute().parent.is_dir():
        raise CkptconvError(
            f"{dst}: the folder {dst.absolute().parent} does not exist; create it first "
            "(ckptconv does not create folders, so a typo cannot scatter output)."
        )
    if not (dst.exists() or dst.is_symlink()):
        return
    why = _not_replaceable(dst)
    if why is not None:
        inside = f" (one inside it: {dst}/<name>)" if dst.is_dir() else ""
        raise OutputExistsError(
            f"{dst} exists and is {why}; ckptconv replaces (with --force) only a checkpoint, so "
            f"nothing was written or deleted. Choose another path{inside}, or remove it yourself."
        )
    if not force:
        raise OutputExistsError(
            f"{dst} already exists; pass --force to replace it, or choose another path."
        )


#: Files an Orbax step or CheckpointManager root holds beside its items and steps.
_ORBAX_FILES = {"_CHECKPOINT_METADATA", "commit_success.txt", "_METADATA", "descriptor.pbtxt"}


def _not_replaceable(dst: Path) -> str | None:
    """Why ``--force`` must not replace ``dst``, or None: a checkpoint (a file
    its format reads; an Orbax item; a step or manager root with nothing but
    Orbax's files beside its items or steps; a Hugging Face sharded folder), an
    empty folder or file, or a symlink (the link is replaced, not what it
    points to) may go. A trial's ``to-loop … hf_out --force``, where
    ``hf_out/`` held the model's config.json, deleted the folder and wrote a
    msgpack file in its place; a review's project folder (an Orbax item beside
    train.py) looked like a step."""
    if dst.is_symlink():
        return None
    if dst.is_dir():
        names = sorted(p.name for p in dst.iterdir())
        if not names:
            return None
    elif dst.stat().st_size == 0:
        return None
    else:
        names = []
    from ckptconv import formats

    for module in formats.FORMATS.values():
        if module.sniff(dst) is not None:
            continue
        try:
            layout = module.describe(dst)
            if dst.is_file():
                module.read_lazy(dst)  # (msgpack's sniff reads one byte)
        except Exception:
            continue
        stray = [n for n in names if (dst / n).is_file() and n not in _ORBAX_FILES
                 and not n.startswith(".")] if layout.format == "orbax" and layout.kind != "item" else []
        if not stray:
            return None
        return f"a folder holding an Orbax checkpoint beside other files ({_listed(stray)})"
    if dst.is_dir():
        return f"a folder that no format reads as a checkpoint (it holds {_listed(names)})"
    return "a file that no format reads as a checkpoint"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


_COMMIT_FILE = "commit_success.txt"


def _commit_bucket(out: storage.BucketPath, layout: Layout | None) -> None:
    """Writes the commit markers of a complete bucket output: every item's
    (a prefix holding ``_METADATA``), then the step's (a CheckpointManager
    step or root output: the step directory, as Orbax's `CommitFileTemporaryPath`
    finalizes a step after its items), so a reader never takes a step whose
    items are unfinished for a checkpoint."""
    items = sorted({p.parent for p in out.rglob("_METADATA")}, key=str)
    steps = sorted({p.parent for p in out.rglob("_CHECKPOINT_METADATA")} - set(items), key=str)
    if layout is not None and layout.kind in ("step", "root") and layout.items:
        rel = next(iter(layout.items.values())).parent.relative_to(layout.path)
        step_dir = out / str(rel) if str(rel) != "." else out
        steps = [s for s in steps if s != step_dir] + [step_dir]
    for path in [*items, *steps]:
        (path / _COMMIT_FILE).write_bytes(f"Checkpoint commit was successful to {path}".encode())


@contextlib.contextmanager
def _bucket_output(dst: storage.BucketPath) -> Iterator[storage.BucketPath]:
    """Yield ``dst`` itself (a bucket has no rename: OUT is written in place,
    its commit markers last, see `_commit_bucket`). On any error or interrupt,
    what was written under ``dst`` is deleted (best effort) and the error says
    so; an interrupt carries the sentence for the CLI (``ckptconv_message``)."""
    try:
        yield dst
    except OutputExistsError:
        raise  # not ours: another writer's objects appeared under dst
    except BaseException as e:
        why = storage.remove_written(dst)
        said = (
            f"what was written under {dst} was deleted" if why is None
            else f"deleting what was written under {dst} failed ({why}); delete it by hand "
            "(gcloud storage rm -r / aws s3 rm --recursive)"
        )
        if isinstance(e, CkptconvError) and e.args and isinstance(e.args[0], str):
            e.args = (f"{e.args[0].rstrip()} ({said}.)",) + e.args[1:]
        elif isinstance(e, KeyboardInterrupt):
            e.ckptconv_message = f"interrupted; {said}, and the input is unchanged."  # type: ignore[attr-defined]
        elif isinstance(e, Exception):
            raise FormatError(f"cannot write {dst}: {e}; {said}, and the input is unchanged.") from e
        raise


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (or the file itself)."""
    paths = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_output(dst: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; move it into place only on success.

    Leftovers of earlier runs that were killed (SIGKILL, power loss) carry a
    dead process's id in their name and are removed first. An ``OSError``
    while writing (read-only or full disk, permissions) becomes one
    `FormatError` naming ``dst``. With ``force``, two conversions racing for
    one ``dst`` each move the other's result aside and retry, so the survivor
    is one complete output.
    """
    _remove_stale(dst)
    tmp = dst.parent / f".{dst.name}.ckptconv-tmp-{os.getpid()}"
    olds: list[Path] = []
    done = renaming = False
    _remove(tmp)
    try:
        try:
            yield tmp
            for attempt in range(20):
                if dst.exists() or dst.is_symlink():
                    if not force:  # appeared while we were writing
                        raise OutputExistsError(
                            f"{dst} appeared during the conversion; not replacing it."
                        )
                    old = dst.parent / f".{dst.name}.ckptconv-old-{os.getpid()}-{attempt}"
                    try:
                        os.rename(dst, old)
                    except FileNotFoundError:
                        continue  # another run moved it first
                    olds.append(old)
                try:
                    renaming = True
                    if tmp.is_dir():
                        os.rename(tmp, dst)  # fails if another run put a directory there
                    else:
                        os.replace(tmp, dst)
                    done = True
                    errors.completed.append(dst)
                    break
                except OSError as e:  # another run's OUT got there first
                    if not (dst.exists() and force) or isinstance(e, PermissionError):
                        raise
            else:
                raise OutputExistsError(f"{dst}: kept being replaced by another run; try again.")
        except CkptconvError as e:
            # The temporary name is ckptconv's business: messages name OUT.
            if e.args and isinstance(e.args[0], str) and str(tmp) in e.args[0]:
                named = re.sub(re.escape(str(tmp)) + r"[^\s:'\"]*", str(dst), e.args[0])
                e.args = (named,) + e.args[1:]
            raise
        except OSError as e:
            raise FormatError(
                f"cannot write {dst}: {e.strerror or e}. Check that "
                f"{dst.absolute().parent} is writable and has free space; nothing was written "
                "and the input is unchanged."
            ) from e
    finally:
        if renaming and not done and not os.path.lexists(tmp) and os.path.lexists(dst):
            # A signal right after the rename: OUT is complete and in place.
            done = True
            errors.completed.append(dst)
        _remove_own(tmp, settle=not done)
        for old in olds:
            _remove(old)


def _remove_own(tmp: Path, *, settle: bool) -> None:
    """Remove ``tmp`` and the writers' own temporaries beside it (``tmp.*``,
    ``.tmp.*``). After a failure or interrupt (``settle``), TensorStore's
    threads may still finish a write or two into a folder just removed (the
    Orbax writer waits for its commits, but not for every write TensorStore
    started for them: without these looks 1 in ~60 interrupted runs left a
    folder behind; a write held up by a busy disk can take longer), so look
    again until nothing has appeared for a second (at most about 10 s)."""
    import time

    quiet = 0
    for _ in range(200):
        found = [
            p for p in tmp.parent.iterdir()
            if p.name == tmp.name or p.name.startswith((tmp.name + ".", "." + tmp.name + "."))
        ]
        for p in found:
            _remove(p)
        quiet = 0 if found else quiet + 1
        if quiet >= (20 if settle else 1):
            return
        time.sleep(0.05)


_LEFTOVER = re.compile(r"^\.?\.(?P<name>.+?)\.ckptconv-(?:tmp|old)-(?P<pid>\d+)")


def _remove_stale(dst: Path) -> None:
    """Remove temporary files of earlier conversions to ``dst`` whose process is
    gone (``.OUT.ckptconv-tmp-PID…``, and the format writers' files inside that name)."""
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m and m.group("name") == dst.name:
            pid = int(m.group("pid"))
            if pid != os.getpid() and not _alive(pid):
                _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
