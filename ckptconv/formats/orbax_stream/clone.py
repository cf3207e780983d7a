"""Orbax conversion at the cost of the metadata: clone the database, rename keys.

An Orbax item keeps its arrays in an OCDBT database: ``manifest.ocdbt`` (the
root of a B-tree of keys), and data files under ``d/`` (and, for multi-process
saves, ``ocdbt.process_*/d/``) that hold the B-tree nodes and the chunk
values. OCDBT never writes into a data file once it is written: a new version
of the database adds new data files and a new manifest. So a converted item
does not need its own copy of the data:

1. `share_database` clones IN's database into OUT: every data file is shared
   (a hard link where IN and OUT are on one filesystem, else a whole-file copy,
   through ``copy_file_range`` so that filesystems that can share extents,
   reflinks, do), the manifests are copied;
2. `rename_keys` opens OUT's database and, in one OCDBT transaction, copies
   each chunk's key to its new name by reference
   (``KvStore.experimental_copy_range_to``: the new key points at the same
   bytes of the same data file, nothing is read), writes the new arrays'
   ``.zarray`` / ``zarr.json``, and deletes the old keys. Committing it writes
   a few new B-tree nodes (new files under ``d/``) and a new manifest.

What sharing means: IN and OUT are two complete, independent checkpoints
that happen to hold the same data files. Deleting either one is safe (a hard
link keeps a file alive while either side names it); nothing ever writes
into a data file (not ckptconv, not TensorStore, not Orbax: OCDBT writes new
files and replaces its manifest by renaming), so neither side can change the
other. Tools that count disk use per directory (``du`` of one side) count the
shared files on both. ``copy=True`` (``--copy``) gives OUT files of its own:
step 1 copies every data file whole (`copy_whole`, in the kernel, as ``cp``
copies), and step 2 is the same.

TensorStore 0.1.86, checked here: a transaction on the *target* of
``experimental_copy_range_to`` works (copies, metadata writes and the deletes
commit at once, the fastest of the three ways tried), a transaction on the
*source* is refused ("Source transactions not supported"); new data files are
written under fresh random names, by the file kvstore's write-then-rename, so
a name that happened to collide could only replace OUT's link, never the
file IN holds. Tests check IN's files' hashes and mtimes after conversions
that finish and conversions that fail half-way.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tensorstore as ts

from ckptconv.formats.orbax_stream.runner import _gather

__all__ = ["Shared", "copy_item", "prefix_range", "rename_keys", "share_database", "share_file"]

OCDBT_MANIFEST = "manifest.ocdbt"
DATA_DIR = "d"
PROCESS_PREFIX = "ocdbt.process_"

# errnos of a hard link that cannot be made: another filesystem, a filesystem
# without links (FAT, some FUSE and network mounts), too many links.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}
# errnos of a copy_file_range that the kernel or filesystem does not offer.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


@dataclass
class Shared:
    """What `share_database` (or `copy_item`) did: data files linked or
    copied whole, and their bytes."""

    linked: int = 0
    copied: int = 0
    linked_bytes: int = 0
    copied_bytes: int = 0

    def add(self, other: Shared) -> None:
        self.linked += other.linked
        self.copied += other.copied
        self.linked_bytes += other.linked_bytes
        self.copied_bytes += other.copied_bytes


def is_data_file(item: Path, path: Path) -> bool:
    """Whether ``path`` is an OCDBT data file of the item directory ``item``:
    a file directly under ``item/d/`` or ``item/ocdbt.process_*/d/``."""
    try:
        rel = path.relative_to(item).parts
    except ValueError:
        return False
    return (len(rel) == 2 and rel[0] == DATA_DIR) or (
        len(rel) == 3 and rel[0].startswith(PROCESS_PREFIX) and rel[1] == DATA_DIR
    )


def share_file(src: Path, dst: Path, shared: Shared) -> None:
    """``dst`` becomes the data file ``src``: a hard link, else a whole copy."""
    size = src.stat().st_size
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    else:
        shared.linked += 1
        shared.linked_bytes += size
        return
    copy_whole(src, dst)
    shared.copied += 1
    shared.copied_bytes += size


def copy_whole(src: Path, dst: Path) -> None:
    """Copies a file by ``copy_file_range`` (in the kernel; extents shared
    where the filesystem can), or by reading and writing where it cannot."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        remaining = os.fstat(fin.fileno()).st_size
        try:
            while remaining > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(remaining, 1 << 30))
                if n == 0:
                    break
                remaining -= n
            return
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
        fin.seek(0)
        fout.seek(0)
        fout.truncate()
        shutil.copyfileobj(fin, fout, 1 << 20)


def share_database(src: Path, dst: Path, *, link: bool = True) -> Shared:
    """Clones the OCDBT database of the item directory ``src`` into ``dst``
    (an empty directory): data files shared (`share_file`), or with ``link``
    false copied whole (`copy_whole`: files of OUT's own, ``--copy``);
    manifests copied. Nothing else of the item is copied: the writer writes
    its own metadata."""
    shared = Shared()
    for entry in sorted(src.iterdir()):
        if entry.name == OCDBT_MANIFEST and entry.is_file():
            shutil.copyfile(entry, dst / entry.name)
        elif entry.name == DATA_DIR and entry.is_dir():
            _share_data_dir(entry, dst / DATA_DIR, shared, link)
        elif entry.name.startswith(PROCESS_PREFIX) and entry.is_dir():
            sub = dst / entry.name
            sub.mkdir()
            for child in sorted(entry.iterdir()):
                if child.name == DATA_DIR and child.is_dir():
                    _share_data_dir(child, sub / DATA_DIR, shared, link)
                elif child.is_file():
                    shutil.copyfile(child, sub / child.name)
    return shared


def _share_data_dir(src: Path, dst: Path, shared: Shared, link: bool) -> None:
    dst.mkdir()
    for entry in os.scandir(src):
        if entry.is_file(follow_symlinks=False):
            if link:
                share_file(Path(entry.path), dst / entry.name, shared)
            else:
                copy_whole(Path(entry.path), dst / entry.name)
                shared.copied += 1
                shared.copied_bytes += entry.stat(follow_symlinks=False).st_size


def copy_item(src: Path, dst: Path, *, share: bool = True) -> Shared:
    """Copies an Orbax item directory unchanged (an item a conversion leaves
    alone): its data files shared (`share_file`) unless ``share`` is false,
    everything else copied (symlinks stay symlinks)."""
    shared = Shared()

    def copy(s: str, d: str) -> None:
        if share and is_data_file(src, Path(s)) and not Path(s).is_symlink():
            share_file(Path(s), Path(d), shared)
        else:
            shutil.copy2(s, d, follow_symlinks=False)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)
    return shared


def prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """The keys that start with ``prefix`` (non-empty)."""
    last = prefix.encode()
    # The least key greater than every key with this prefix: the prefix with
    # its last byte incremented (bytes 0xff are dropped first).
    stripped = last.rstrip(b"\xff")
    end = stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else b""
    return ts.KvStore.KeyRange(last, end)


# One key: the source of a copy is the chunk's own key, so the range relative
# to it holds exactly the empty suffix.
_ONE_KEY = ts.KvStore.KeyRange(b"", b"\x00")


async def rename_keys(
    kv: ts.KvStore,
    moves: list[tuple[str, str]],
    writes: dict[str, bytes],
    drops: list[str],
) -> None:
    """In one transaction of ``kv`` (OUT's OCDBT store): each ``(old, new)``
    key of ``moves`` is copied by reference (the value is not read), the
    ``writes`` are written, and every key under each prefix of ``drops`` is
    deleted. The copies read the committed database (TensorStore refuses a
    transaction on a copy's source), so deleting their sources in the same
    transaction is safe."""
    txn = ts.Transaction()
    out = kv.with_transaction(txn)
    try:
        await _gather(
            *(
                (kv / old).experimental_copy_range_to(out / new, source_range=_ONE_KEY)
                for old, new in moves
            )
        )
        await _gather(*(out.write(key, value) for key, value in writes.items()))
        await _gather(*(out.delete_range(prefix_range(p)) for p in drops))
        await txn.commit_async()
    except BaseException:
        if not txn.commit_started:
            txn.abort()
        raise
