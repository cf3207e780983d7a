"""Bucket locations: ``gs://bucket/path`` and ``s3://bucket/path``.

`BucketPath` quacks like the part of `pathlib.Path` that ckptconv's Orbax code
uses (``/``, ``.name``, ``.parent``, ``.exists()``, ``.is_dir()``,
``.is_file()``, ``.iterdir()``, ``.glob()``, ``.rglob()``, ``.read_bytes()``,
``.write_bytes()``), over TensorStore's ``gcs`` and ``s3`` kvstores (already a
dependency; no gcsfs, s3fs or boto3). A bucket has objects, not directories: a
"directory" is a prefix that some object's key starts with (``prefix/``), and
``mkdir`` does nothing. What has no equivalent (rename, fsync, symlinks,
``open()``) the callers branch on with `is_bucket`.

Credentials and endpoints come from the environment:

* S3: TensorStore reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION`` itself, but no
  variable sets the endpoint; `kvstore_spec` puts ``AWS_ENDPOINT_URL_S3`` (else
  ``AWS_ENDPOINT_URL``, the names the AWS CLI and SDKs read) into the spec.
* GCS: TensorStore's own rules (application default credentials;
  ``TENSORSTORE_GCS_HTTP_URL`` points it at an emulator, read once per process).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ckptconv.errors import FormatError

SCHEMES = ("gs", "s3")
_DRIVERS = {"gs": "gcs", "s3": "s3"}


def is_bucket(path: Any) -> bool:
    """Whether ``path`` is a bucket location (a `BucketPath` or a ``gs://``/``s3://`` string)."""
    if isinstance(path, BucketPath):
        return True
    return isinstance(path, str) and path.startswith(tuple(f"{s}://" for s in SCHEMES))


def as_path(path: str | os.PathLike) -> Path | BucketPath:
    """``path`` as a `BucketPath` (``gs://``, ``s3://``) or a `pathlib.Path`.

    A `Path` made from a URL has lost a slash (``Path("gs://b/x")`` is
    ``gs:/b/x``); such a path is taken for the URL it was.
    """
    if isinstance(path, BucketPath):
        return path
    text = os.fspath(path)
    for scheme in SCHEMES:
        if text.startswith(f"{scheme}://"):
            return BucketPath(text)
        if isinstance(path, Path) and text.startswith(f"{scheme}:/") and len(text) > len(scheme) + 2:
            return BucketPath(f"{scheme}://{text[len(scheme) + 2:]}")
    return Path(path)


_KVSTORES: dict[tuple[str, str, str | None], Any] = {}
_CONTEXT: list[Any] = []
#: Listings remembered while `cached_listings` is active (innermost last).
_MEMO: list[dict[tuple[str, str, str], list[str]]] = []


@contextlib.contextmanager
def cached_listings() -> Iterator[None]:
    """Remember bucket listings for a while: within this block a listing is
    answered from an earlier one that covers it (a key prefix of it), so
    recognising a checkpoint's layout (``is_dir``, ``is_file``, ``iterdir`` of
    every step and item) costs a few requests, not one per question (a
    two-step CheckpointManager root took 180). For reading phases only:
    writes made through `BucketPath` in the block forget what was listed,
    but writes made by TensorStore itself (the Orbax engine) cannot, so no
    output is written inside one."""
    _MEMO.append({})
    try:
        yield
    finally:
        _MEMO.pop()


def _forget() -> None:
    for memo in _MEMO:
        memo.clear()


def _prefix_range(prefix: str) -> Any:
    import tensorstore as ts

    if not prefix:
        return ts.KvStore.KeyRange()
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


class BucketPath:
    """An object or prefix in a bucket, as a small `pathlib.Path` look-alike."""

    __slots__ = ("scheme", "bucket", "key")

    def __init__(self, url: str, *, _parts: tuple[str, str, str] | None = None) -> None:
        if _parts is not None:
            self.scheme, self.bucket, self.key = _parts
            return
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise FormatError(f"{url}: not a bucket URL (gs://BUCKET/PATH or s3://BUCKET/PATH)")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise FormatError(f"{url}: no bucket name; write {scheme}://BUCKET/PATH")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise FormatError(f"{url}: '..' has no meaning in a bucket path; write the path in full")
        self.scheme, self.bucket, self.key = scheme, bucket, "/".join(parts)

    # -- names ------------------------------------------------------------------

    def _with_key(self, key: str) -> BucketPath:
        return BucketPath("", _parts=(self.scheme, self.bucket, key))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def __fspath__(self) -> str:  # so that os.fspath, f-strings and joins name the URL
        return str(self)

    def __repr__(self) -> str:
        return f"BucketPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketPath) and (self.scheme, self.bucket, self.key) == (
            other.scheme, other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.scheme, self.bucket, self.key))

    def __lt__(self, other: BucketPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str | os.PathLike) -> BucketPath:
        parts = [p for p in str(name).split("/") if p not in ("", ".")]
        return self._with_key("/".join([self.key, *parts] if self.key else parts))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> BucketPath:
        return self._with_key(self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def parents(self) -> list[BucketPath]:
        out, p = [], self
        while p.key:
            p = p.parent
            out.append(p)
        return out

    def with_name(self, name: str) -> BucketPath:
        return self.parent / name

    def relative_to(self, other: BucketPath) -> PurePosixPath:
        if self == other:
            return PurePosixPath(".")
        if (self.scheme, self.bucket) != (other.scheme, other.bucket) or not self.key.startswith(
            other.key + "/" if other.key else ""
        ):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key[len(other.key) + 1 if other.key else 0 :])

    def absolute(self) -> BucketPath:
        return self

    def resolve(self) -> BucketPath:
        return self

    # -- TensorStore ----------------------------------------------------------------

    def kvstore_spec(self) -> dict[str, Any]:
        """TensorStore's kvstore spec for this prefix (``path`` ends in ``/``)."""
        spec: dict[str, Any] = {
            "driver": _DRIVERS[self.scheme],
            "bucket": self.bucket,
            "path": f"{self.key}/" if self.key else "",
        }
        if self.scheme == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                spec["endpoint"] = endpoint
        return spec

    def _kv(self) -> Any:
        """The bucket's kvstore (its root), opened once per process and endpoint."""
        import tensorstore as ts

        spec = self._with_key("").kvstore_spec()
        cache_key = (self.scheme, self.bucket, spec.get("endpoint"))
        kv = _KVSTORES.get(cache_key)
        if kv is None:
            if not _CONTEXT:
                _CONTEXT.append(ts.Context())
            try:
                kv = ts.KvStore.open(spec, context=_CONTEXT[0]).result()
            except Exception as e:
                raise self._error("cannot open the bucket", e) from e
            _KVSTORES[cache_key] = kv
        return kv

    def _error(self, what: str, e: BaseException) -> FormatError:
        hint = (
            "check the bucket name, the endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) "
            "and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)"
            if self.scheme == "s3"
            else "check the bucket name and the credentials (gcloud auth "
            "application-default login; TENSORSTORE_GCS_HTTP_URL for an emulator)"
        )
        # TensorStore appends the response body, headers and source locations in [...].
        text = str(e).split(" [", 1)[0]
        return FormatError(f"{self}: {what} ({text}); {hint}.")

    def _list(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, sorted."""
        memo = _MEMO[-1] if _MEMO else None
        if memo is not None:
            for (scheme, bucket, listed), keys in memo.items():
                if (scheme, bucket) == (self.scheme, self.bucket) and prefix.startswith(listed):
                    return [k for k in keys if k.startswith(prefix)]
        try:
            keys = self._kv().list(_prefix_range(prefix)).result()
        except FormatError:
            raise
        except Exception as e:
            raise self._error(f"cannot list bucket {self.bucket}", e) from e
        got = sorted(k.decode() for k in keys)
        if memo is not None:
            memo[(self.scheme, self.bucket, prefix)] = got
        return got

    def _dir_prefix(self) -> str:
        return f"{self.key}/" if self.key else ""

    def keys(self) -> list[str]:
        """Every object under this prefix, as keys relative to it."""
        prefix = self._dir_prefix()
        return [k[len(prefix):] for k in self._list(prefix)]

    # -- queries ------------------------------------------------------------------

    def is_file(self) -> bool:
        """Whether an object has exactly this key."""
        return bool(self.key) and self.key in self._list(self.key)

    def is_dir(self) -> bool:
        """Whether some object's key starts with ``self.key + "/"`` (a
        bucket's root: whether it can be listed)."""
        return bool(self.keys()) if self.key else (self._list(""), True)[1]

    def exists(self) -> bool:
        """An object with this key, or objects under it (one listing)."""
        if not self.key:
            return self.is_dir()
        return any(k == self.key or k.startswith(self.key + "/") for k in self._list(self.key))

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[BucketPath]:
        names: list[str] = []
        for k in self.keys():
            first = k.split("/", 1)[0]
            if first and first not in names:
                names.append(first)
        return iter([self / n for n in names])

    def glob(self, pattern: str) -> Iterator[BucketPath]:
        """Children whose name matches ``pattern`` (one level, no ``**``)."""
        return iter([c for c in self.iterdir() if fnmatch.fnmatchcase(c.name, pattern)])

    def rglob(self, pattern: str) -> Iterator[BucketPath]:
        """Objects at any depth below whose name matches ``pattern``."""
        return iter(
            [self / k for k in self.keys() if fnmatch.fnmatchcase(k.rsplit("/", 1)[-1], pattern)]
        )

    # -- objects --------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        try:
            res = self._kv().read(self.key).result()
        except Exception as e:
            raise self._error("cannot read the object", e) from e
        if res.state != "value":
            raise FileNotFoundError(errno.ENOENT, "no such object", str(self))
        return bytes(res.value)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def write_bytes(self, data: bytes) -> int:
        _forget()
        try:
            self._kv().write(self.key, data).result()
        except Exception as e:
            raise self._error("cannot write the object", e) from e
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a bucket's prefixes exist once an object is under them."""

    def unlink(self, missing_ok: bool = False) -> None:
        import tensorstore as ts

        _forget()
        self._kv().delete_range(ts.KvStore.KeyRange(self.key, self.key + "\0")).result()

    def remove_tree(self) -> None:
        """Deletes every object under this prefix (``key/…``)."""
        prefix = self._dir_prefix()
        if not prefix:
            raise FormatError(f"{self}: refusing to delete a whole bucket")
        _forget()
        self._kv().delete_range(_prefix_range(prefix)).result()


def remove_written(out: BucketPath, *, settle: float = 0.5) -> str | None:
    """Deletes what a failed write left under ``out`` (best effort), then looks
    again until nothing has appeared for ``settle`` seconds: TensorStore may
    still finish a write it started. Returns why it could not, or None."""
    quiet_since = time.monotonic()
    deadline = quiet_since + 10 * settle
    try:
        while True:
            if out.keys():
                out.remove_tree()
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                return None
            if time.monotonic() > deadline:
                return f"objects kept appearing under {out}"
            time.sleep(0.1)
    except BaseException as e:  # noqa: BLE001 (an interrupt here must not hide the first)
        return f"{type(e).__name__}: {e}"


def copy_tree(src: Path | BucketPath, dst: Path | BucketPath) -> None:
    """Copies the files (objects) under ``src`` to ``dst``, one at a time
    (for small files beside the checkpoint's items: metrics, metadata; an
    item's data goes through the Orbax engine). Symlinks are read through."""
    if isinstance(src, BucketPath):
        rels = src.keys() if src.is_dir() else [""]
    else:
        rels = (
            [str(p.relative_to(src)) for p in sorted(src.rglob("*")) if p.is_file()]
            if src.is_dir() else [""]
        )
    for rel in rels:
        s = src / rel if rel else src
        d = dst / rel if rel else dst
        if isinstance(d, Path):
            d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(s.read_bytes())
