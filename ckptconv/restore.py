"""Restoring a checkpoint of any layout straight into a train state (``ckptconv.restore``).

A training script gives the state it wants (``like``: a `jax.eval_shape`
result, `jax.ShapeDtypeStruct` leaves with or without a ``.sharding``,
concrete arrays, a flax ``TrainState``, an ``nnx.State``), in loop or scan
form. From the checkpoint's metadata and ``like``'s structure alone (no array
data read), `plan_restore` works out whether and how to stack or unstack (`ckptconv.like`,
the same inference as ``--like REF``), runs the same lazy `to_scan` / `to_loop`
as `convert`, and checks that the result has ``like``'s paths, shapes and
dtypes; a mismatch is an error naming the paths on each side, before anything
is read. `RestorePlan.read` then builds each array on its target sharding:
every device's part is read on its own (each process reads only what its
devices hold), one leaf at a time, a layer of a stack at a time, so host
memory holds the restored arrays and one part of one leaf, and nothing is
written.

The reading is ckptconv's own (TensorStore regions for Orbax, views of the
memory-mapped file for msgpack and safetensors) rather than Orbax's
``restore`` with ``ArrayRestoreArgs``: a stacked leaf is N arrays on disk and
one array in memory, and a layer of a stack is a region of one, which no
Orbax restore target can say. The regions read are the ones Orbax reads for
the same shardings (only the chunks a part touches); tests check the result
against Orbax's own restore where Orbax can do it.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptconv import formats, lazy, storage, subset, tree
from ckptconv import like as like_mod
from ckptconv.convert.plan import LOOP_OPTIONS, SCAN_OPTIONS, plan_item
from ckptconv.errors import CkptconvError, GroupError, NothingToConvertError

log = logging.getLogger("ckptconv")

#: Options that say the direction on their own.
_SCAN_ONLY = ("into", "remainder", "groups")
_LOOP_ONLY = ("source", "stacks")


class RestoreError(CkptconvError, ValueError):
    """The checkpoint cannot be restored into ``like`` (structure, shapes or dtypes)."""


@dataclass
class RestorePlan:
    """What `restore` will do, worked out from metadata alone.

    Attributes:
      path: the checkpoint given.
      item: the Orbax item restored (``""`` for a lone item or a file).
      to: ``"scan"``, ``"loop"`` or None (the checkpoint is in ``like``'s layout).
      options: the layout options used (given, or inferred from ``like``).
      inferred: True when the options were worked out from ``like``.
      groups: the groups stacked or the stacks unstacked.
      casts: ``(path, stored dtype, like's dtype)`` of each leaf cast.
    """

    path: Path
    item: str
    to: str | None
    options: dict[str, Any]
    inferred: bool
    groups: list[Any] = field(default_factory=list)
    casts: list[tuple[str, np.dtype, np.dtype]] = field(default_factory=list)
    only: list[str] = field(default_factory=list)
    _source: Path | None = None
    _format: Any = None
    _leaves: list[tuple[str, Any, Any]] = field(default_factory=list)  # (path, lazy leaf, like's leaf)
    _treedef: Any = None

    def describe(self) -> str:
        """One paragraph: what is read, how it is converted, what is cast."""
        where = f"{self.path}" + (f" (item {self.item!r})" if self.item else "")
        n = sum(lz is not None for _, lz, _ in self._leaves)
        if self.to is None:
            how = "already in like's layout: read as stored"
        else:
            opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            src = "worked out from like" if self.inferred else "given"
            how = f"to-{self.to} ({opts}; {src}): " + "; ".join(g.describe() for g in self.groups)
        text = f"restore {where} into like ({n} leaves): {how}"
        if self.only:
            kept = len(self._leaves) - n
            text += f"; only {', '.join(self.only)} ({kept} other leaves of like returned as given)"
        if self.casts:
            p, a, b = self.casts[0]
            text += f"; cast {len(self.casts)} leaves to like's dtypes ({p}: {a} -> {b} …)"
        return text + "."

    def read(self) -> Any:
        """The restored tree, in ``like``'s structure, each array on its target sharding."""
        import jax

        region = _region_reader(self._format, self._source)
        out: list[Any] = [None] * len(self._leaves)
        pending: deque[tuple[int, Future, int]] = deque()
        held = 0

        def finish() -> None:
            nonlocal held
            i, future, nbytes = pending.popleft()
            out[i] = future.result()
            held -= nbytes
            _trim()

        pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="ckptconv-restore")
        try:
            for i, (p, lz, want) in enumerate(self._leaves):
                if lz is None:
                    out[i] = want
                    continue
                if tree.is_number(lz):  # stored as a number (msgpack's step): a 0-d array
                    lz = _number_leaf(lz, want, p)
                # Leaves are read a few at a time, within a budget of bytes in
                # flight; one larger than the budget is read alone.
                while pending and held + lz.nbytes > _IN_FLIGHT:
                    finish()
                pending.append((i, pool.submit(_build, lz, want, region, p), lz.nbytes))
                held += lz.nbytes
            while pending:
                finish()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return jax.tree_util.tree_unflatten(self._treedef, out)


#: Reads in flight at once: TensorStore decodes each on a thread of its own,
#: and a layer's read waits on the disk, so a few overlap well.
_WORKERS = 4
#: Bytes of leaves being read at once (beyond the restored arrays).
_IN_FLIGHT = 64 << 20

_LIBC: Any = None


def _trim() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``).

    The layer buffers a leaf is read through (TensorStore's, numpy's) are
    freed into glibc's heap, which keeps them: after each leaf they are
    returned, so the process holds the restored arrays, not them too. Measured
    with bench/restore_bench.py (1.5 GB, loop -> scan): peak RSS 2061 MB
    without, 1892 MB with (1.35x -> 1.24x the restored bytes), at the same
    speed. Nothing on other C libraries.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def restore(
    path: str | Path,
    *,
    like: Any = None,
    step: int | None = None,
    item: str | None = None,
    to: str | None = None,
    cast: bool = False,
    only: str | list[str] | None = None,
    **options: Any,
) -> Any:
    """Read a checkpoint, in any layout, into ``like``'s layout and shardings.

    Args:
      path: a msgpack or safetensors file, a Hugging Face directory, an Orbax
        item, a CheckpointManager step or root.
      like: the state to restore into: a pytree (dicts, lists, flax
        ``TrainState``, optax states, ``nnx.State``) whose leaves are
        `jax.ShapeDtypeStruct` (with or without ``.sharding``), `jax.Array`
        (its sharding is used), numpy arrays (restored as numpy) or Python
        scalars. Without it: the tree as stored, as `ckptconv.load`.
      step: for a CheckpointManager root, the step (default: the latest).
      item: for a CheckpointManager step with several items, the one to
        restore (default: the one whose structure fits ``like``).
      to: ``"scan"`` or ``"loop"``; default: worked out from ``like``.
      cast: round stored values to ``like``'s dtypes where they differ
        (float32 checkpoint, bfloat16 state). Off: a dtype difference is an
        error, except integer scalars (a Python int step Orbax saved as int64).
      only: restore only these subtrees of ``like`` (``"params"``, a list for
        several); ``like``'s other leaves are returned as given (a freshly
        initialised state's RNG streams, which loop and scan forms of one
        model need not hold alike: MaxText's ``nnx_aux``). The paths are
        looked up in both trees.
      **options: the layout options of `ckptconv.convert` (``pattern``,
        ``into``, ``axis``, ``axis_for``, ``period``, ``layers``,
        ``remainder``, ``groups``; ``source``, ``stacks``). Default: worked
        out from the checkpoint's and ``like``'s structures.

    Returns:
      ``like``'s structure with restored leaves: `jax.Array`s on their target
      shardings (a leaf without one: on the default device), numpy arrays
      where ``like`` has numpy arrays. Nothing is written to disk. What was
      decided is logged on the ``ckptconv`` logger (INFO) and is `plan_restore`'s
      ``describe()``.

    Raises:
      RestoreError: the checkpoint does not fit ``like``: the message lists
        the paths missing on each side and the shape and dtype differences.
      CkptconvError: an unreadable checkpoint, inconsistent layers, bad options.
    """
    if like is None:
        given = [k for k, v in {"item": item, "to": to, "cast": cast or None, "only": only,
                                **options}.items() if v is not None]
        if given:
            raise CkptconvError(
                f"restore({str(path)!r}) without like= reads the tree as stored and takes "
                f"only step=; {', '.join(given)} say how to fit a target: pass it as like= "
                "(an abstract train state, e.g. jax.eval_shape of its init)."
            )
        from ckptconv.io import load

        return load(path, step=step)
    p = plan_restore(path, like=like, step=step, item=item, to=to, cast=cast, only=only, **options)
    log.info(p.describe())
    return p.read()


def plan_restore(
    path: str | Path,
    *,
    like: Any,
    step: int | None = None,
    item: str | None = None,
    to: str | None = None,
    cast: bool = False,
    only: str | list[str] | None = None,
    **options: Any,
) -> RestorePlan:
    """What `restore` would do (same arguments), reading no array data.

    Raises:
      RestoreError, CkptconvError: as `restore`.
    """
    import jax

    path = storage.as_path(path)
    if to not in (None, "scan", "loop"):
        raise CkptconvError(f"to must be 'scan', 'loop' or None, got {to!r}.")
    allowed = set(SCAN_OPTIONS) | set(LOOP_OPTIONS)
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise CkptconvError(
            f"restore takes no option {', '.join(unknown)}; its layout options are "
            f"{', '.join(sorted(allowed))}."
        )
    with storage.cached_listings():
        fmt = formats.detect(path)
        layout = fmt.describe(path, step)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    wants = [(_key_path(kp), x) for kp, x in flat]
    keep = tuple(subset.parse_path(q, "only") for q in ([only] if isinstance(only, str) else only or ()))
    if keep:
        wants_kept = [(p, x) for p, x in wants if any(p.split("/")[:len(k)] == list(k) for k in keep)]
        missing = [k for k in keep if not any(p.split("/")[:len(k)] == list(k) for p, _ in wants)]
        if missing:
            raise subset.SelectionError(
                f"only={'/'.join(missing[0])!r}: like has no such subtree; its top keys are "
                + ", ".join(sorted({p.split('/')[0] for p, _ in wants})) + "."
            )
    else:
        wants_kept = wants
    _check_like_leaves(wants_kept)
    skeleton = _skeleton(wants_kept)
    names = list(layout.items)
    if item is not None:
        if item not in layout.items:
            raise CkptconvError(
                f"{path}: no item {item!r}; the items here are {', '.join(map(repr, names))}."
            )
        names = [item]
    tried: list[tuple[str, Exception]] = []
    for name in names:
        try:
            p = _plan_item(path, name, layout.items[name], fmt, skeleton, to, cast, options, keep)
        except (RestoreError, GroupError) as e:
            if len(names) == 1:
                raise
            tried.append((name, e))  # another item may fit
            continue
        p._leaves = _pair(p._leaves, wants)
        p._treedef = treedef
        p.casts = [(q, np.dtype(lz.dtype), tree.leaf_dtype(w)) for q, lz, w in p._leaves
                   if lz is not None and not tree.is_number(lz) and not _is_key(tree.leaf_dtype(w))
                   and tree.leaf_dtype(w) is not None and np.dtype(lz.dtype) != tree.leaf_dtype(w)
                   and not tree.is_number(w)]
        p.only = ["/".join(k) for k in keep]
        return p
    raise RestoreError(
        f"{path}: no item fits like: "
        + " ".join(f"item {n!r}: {_strip(str(e), path)}" for n, e in tried)
        + " Pass item= to name the item."
    )


def _root_hint(stored: Any, skeleton: Any) -> str:
    """Where the checkpoint is one subtree of like (a Hugging Face
    flax_model.msgpack holds the params alone; like is ``{"params": …}``), or
    the other way, the call that lines them up."""
    from collections.abc import Mapping

    if not (isinstance(stored, Mapping) and isinstance(skeleton, Mapping)):
        return ""
    def inside(outer: Mapping, other: Mapping) -> str | None:
        """outer's one key, if other's top keys are among what lies under it."""
        if len(outer) != 1:
            return None
        ((k, sub),) = outer.items()
        return k if k not in other and isinstance(sub, Mapping) and set(other) <= set(sub) else None

    k = inside(skeleton, stored)
    if k is not None:
        return (f" The checkpoint's root may be like's {k!r}: restore into it (like[{k!r}], or "
                f"like.{k} of a TrainState) and put the result back under {k!r}.")
    k = inside(stored, skeleton)
    if k is not None:
        return f" like may be the checkpoint's {k!r}: pass like={{{k!r}: like}}."
    return ""


def _strip(message: str, path: Path) -> str:
    return message.removeprefix(f"{path}: ")


def _plan_item(
    path: Path, name: str, item_path: Path, fmt: Any, skeleton: Any,
    to: str | None, cast: bool, options: dict[str, Any], keep: tuple = (),
) -> RestorePlan:
    where = f"{path}" + (f" (item {name!r})" if name else "")
    stored = fmt.read_lazy(item_path)
    if keep:
        stored = subset.keep_only(stored, keep)
        if stored is None:
            raise RestoreError(f"{where}: holds none of only={['/'.join(k) for k in keep]}.")
    given = {k: v for k, v in options.items() if v is not None}
    p = RestorePlan(path, name, None, {}, False, _source=item_path, _format=fmt)
    ignore = _castable(cast)
    names = ("the checkpoint", "like")
    as_stored = like_mod.differences(stored, skeleton, ignore_dtype=ignore, names=names)
    if to is None and not given and not as_stored:
        out = stored  # already in like's layout
    else:
        if to is None:
            to = "loop" if any(k in given for k in _LOOP_ONLY) else (
                "scan" if any(k in given for k in _SCAN_ONLY) else None)
        inferred: dict[str, Any] = {}
        # What like shows is worked out also beside given options (pattern=
        # for auto-numbered layers: like still names `into`); they win.
        pattern = given.get("pattern") if to != "loop" and isinstance(given.get("pattern"), str) else None
        try:
            how, inferred = like_mod.infer(stored, skeleton, pattern)
        except GroupError as e:
            if to is None or not given:
                raise RestoreError(
                    f"{where}: cannot restore into like: {_as_restore(str(e))} As stored, "
                    + "; ".join(as_stored) + "." + _root_hint(stored, skeleton)
                ) from e
            how = to  # the given options say it all
        if to is not None and how != to:
            if not given:
                raise RestoreError(
                    f"{where}: like is in {how} form relative to the checkpoint, so this "
                    f"restore is a to-{how}, not the to-{to} asked for."
                )
            inferred = {}  # the given options decide the direction
        to = how if to is None else to
        opts = {**inferred, **given}
        try:
            out, groups = plan_item(stored, to, opts)
        except NothingToConvertError as e:
            raise RestoreError(f"{where}: {e} As stored, " + "; ".join(as_stored) + ".") from e
        except GroupError as e:
            raise type(e)(f"{where}: {e}") from e
        p.to, p.options, p.inferred, p.groups = to, opts, bool(inferred) and not given, groups
    diff = as_stored if out is stored else like_mod.differences(
        out, skeleton, ignore_dtype=ignore, names=names)
    if diff:
        how = "as stored" if p.to is None else f"after to-{p.to}"
        agree = like_mod.agreeing_top_keys(out, skeleton, ignore_dtype=ignore)
        # Offered where what does not fit is the smaller part of like (a
        # state's RNG streams), not where the model itself does not fit.
        if 2 * sum(_nbytes(skeleton[k]) for k in agree) <= _nbytes(skeleton):
            agree = []
        if all(" dtypes differ: " in d for d in diff):
            hint = " Pass cast=True to round the stored values to like's dtypes."
        elif agree:
            hint = (f" The parts that fit are {', '.join(agree)}: restore only them with only="
                    f"{agree!r} (like's other leaves come back as given).")
        else:
            hint = ""
        raise RestoreError(
            f"{where}: the checkpoint does not fit like ({how}): " + "; ".join(diff)
            + f". Nothing was restored.{hint}"
        )
    p._leaves = [(tree.format_path(k), x, None) for k, x in tree.leaves_with_paths(out)]
    return p


def _as_restore(message: str) -> str:
    """`ckptconv.like`'s words (IN, REF) as a restore's (the checkpoint, like)."""
    message = re.sub(r"\bREF\b", "like", message)
    message = re.sub(r"^IN\b", "The checkpoint", message)
    message = re.sub(r"\bIN\b", "the checkpoint", message)
    return message.replace("cannot see how the checkpoint becomes like's layout: ", "")


def _nbytes(t: Any) -> int:
    return sum(x.nbytes for _, x in tree.leaves_with_paths(t))


def _castable(cast: bool) -> Callable[[Any, Any], bool]:
    """Which stored/like dtype pairs restore casts."""

    def ok(a: Any, b: Any) -> bool:
        da, db = tree.leaf_dtype(a), tree.leaf_dtype(b)
        if cast:
            return True
        return (tree.leaf_shape(a) == () and da is not None and db is not None
                and da.kind in "iu" and db.kind in "iu")

    return ok


def _pair(found: list[tuple[str, Any, Any]], wants: list[tuple[str, Any]]) -> list[tuple[str, Any, Any]]:
    """``(path, lazy leaf, like's leaf)`` in ``like``'s leaf order; a leaf
    ``only`` left out has no lazy leaf (None): like's own comes back."""
    by_path = {p: x for p, x, _ in found}
    return [(p, by_path.get(p), w) for p, w in wants]


def _key_path(kp: tuple) -> str:
    return tree.format_path([tree._key_name(k) for k in kp])


def _check_like_leaves(wants: list[tuple[str, Any]]) -> None:
    for p, x in wants:
        if tree.leaf_shape(x) is None and not tree.is_number(x):
            raise CkptconvError(
                f"like/{p}: of type {type(x).__name__}, not an array, a jax.ShapeDtypeStruct "
                "or a Python number; give like's leaves as arrays or jax.eval_shape's output."
            )


def _skeleton(wants: list[tuple[str, Any]]) -> Any:
    """``like`` as nested dicts of string keys (Orbax's spelling of a pytree
    path) with `lazy.Ref` leaves holding each leaf's shape and dtype."""
    root: dict[str, Any] = {}
    for p, x in wants:
        keys = p.split("/") if p != "<root>" else []
        if not keys:
            raise CkptconvError("like is a single leaf; give the tree (a dict, a train state) to restore into.")
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        shape = tree.leaf_shape(x)
        dtype = tree.leaf_dtype(x)
        if shape is None:  # a Python number
            shape, dtype = (), np.asarray(x).dtype
        elif _is_key(dtype):  # typed PRNG keys: Orbax stores their uint32 key data
            data = _key_data(tuple(shape), dtype)
            shape, dtype = data.shape, data.dtype
        node[keys[-1]] = lazy.Ref(p, tuple(shape), np.dtype(dtype))
    return root


# -------------------------------------------------------------------- reading


def _region_reader(fmt: Any, item: Path) -> Callable[[lazy.Ref, tuple], np.ndarray]:
    """``region(ref, index)``: the part ``index`` (a tuple of ints and slices,
    one per axis) of a stored array, reading no more than the format must."""
    own = getattr(fmt, "read_region", None)
    if own is not None:
        return lambda ref, index: own(item, ref, index)
    # msgpack and safetensors arrays are views of the memory-mapped file.
    return lambda ref, index: np.array(fmt.read_array(item, ref)[index])


def _region(leaf: Any, index: tuple, region: Callable[[lazy.Ref, tuple], np.ndarray]) -> np.ndarray:
    """``np.asarray(leaf)[index]`` for a lazy leaf, ``index`` a slice per axis."""
    if isinstance(leaf, lazy.Cast):
        return _region(leaf.value, index, region).astype(leaf.dtype)
    if isinstance(leaf, lazy.Ref):
        return region(leaf, index)
    if isinstance(leaf, np.ndarray):  # (a number stored as such, `_number_leaf`)
        return leaf[index]
    if isinstance(leaf, lazy.Slice):
        ax = leaf.axis
        return region(leaf.source, index[:ax] + (leaf.index,) + index[ax:])
    if isinstance(leaf, lazy.Stack):
        ax = leaf.axis
        layers = range(*index[ax].indices(leaf.shape[ax]))
        rest = index[:ax] + index[ax + 1:]
        shape = [len(range(*s.indices(n))) for s, n in zip(index, leaf.shape)]
        out = np.empty(shape, leaf.dtype)
        # A layer at a time into the part (a few read at once): no second copy.
        for k, layer in enumerate(_layers_read(leaf, layers, rest, region)):
            out[(slice(None),) * ax + (k,)] = layer
        return out
    raise TypeError(f"not a lazy leaf: {type(leaf).__name__}")


def _full_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A sharding's index (slices, maybe fewer than the axes) as one concrete slice per axis."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


#: A device part of a stacked leaf at least this large is assembled on its
#: device, a layer at a time into a donated buffer, instead of in numpy and
#: then copied: host memory then holds the part once, not twice.
_ON_DEVICE_BYTES = 16 << 20


def _is_key(dtype: Any) -> bool:
    """A typed PRNG key dtype (``key<fry>``: ``nnx.Rngs``, ``jax.random.key``)."""
    import jax

    return dtype is not None and not isinstance(dtype, np.dtype) and jax.dtypes.issubdtype(
        dtype, jax.dtypes.prng_key)


def _key_data(shape: tuple[int, ...], dtype: Any) -> Any:
    """The shape and dtype of the uint32 key data Orbax stores for typed keys."""
    import jax

    return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))


def _number_leaf(value: Any, want: Any, path: str) -> np.ndarray:
    """A leaf stored as a Python number (``flax.serialization.to_bytes`` of a
    train state's ``step``) as the 0-d array `_build` reads like any other.
    A number like's dtype cannot hold (a fraction into an integer, an integer
    out of its range) is an error, not truncated."""
    dtype = np.dtype(type(want)) if tree.is_number(want) else np.dtype(tree.leaf_dtype(want))
    whole = isinstance(value, (bool, int)) or (isinstance(value, float) and value.is_integer())
    if dtype.kind == "b":
        fits = value in (0, 1)
    elif dtype.kind in "iu":
        fits = whole and np.iinfo(dtype).min <= value <= np.iinfo(dtype).max
    else:
        fits = True
    if not fits:
        raise RestoreError(
            f"like/{path}: the checkpoint stores the number {value!r} there, which like's {dtype} "
            f"cannot hold; give like a leaf that can (a Python {type(value).__name__})."
        )
    return np.asarray(value)


def _build(leaf: Any, want: Any, region: Callable, path: str) -> Any:
    """The restored value of one leaf, as ``want`` (like's leaf) says."""
    shape = tuple(leaf.shape)
    dtype = tree.leaf_dtype(want)
    if tree.is_number(want):
        value = _region(leaf, (), region)
        return type(want)(value[()])
    if isinstance(want, (np.ndarray, np.generic)):
        value = _region(leaf, _full_index((), shape), region)
        value = value.astype(dtype, copy=False)
        return value if isinstance(want, np.ndarray) else value[()]
    import jax

    sharding = getattr(want, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key(dtype):
        # Stored as key data (..., 2) uint32: built as that, then wrapped.
        data = _on_shardings(leaf, shape, _data_sharding(sharding, path), leaf.dtype, region)
        return jax.random.wrap_key_data(data, impl=dtype._impl)
    return _on_shardings(leaf, shape, sharding, dtype, region)


def _data_sharding(sharding: Any, path: str) -> Any:
    """A key array's sharding, for its key data (the trailing axes unsharded)."""
    import jax

    # A spec shorter than the rank leaves the trailing axes unsharded.
    if isinstance(sharding, (jax.sharding.NamedSharding, jax.sharding.SingleDeviceSharding)):
        return sharding
    raise CkptconvError(
        f"like/{path}: a PRNG key array with a {type(sharding).__name__}; give it a "
        "NamedSharding or a single device."
    )


def _on_shardings(leaf: Any, shape: tuple[int, ...], sharding: Any, dtype: Any,
                  region: Callable) -> Any:
    """One `jax.Array` of ``shape`` on ``sharding``: each distinct device part read once."""
    import jax

    parts: dict[tuple, Any] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        full = _full_index(index, shape)
        key = tuple((s.start, s.stop) for s in full)
        part = parts.get(key)
        if part is None:
            part = parts[key] = _part(leaf, full, dtype, region, device)
        arrays.append(part if isinstance(part, jax.Array) and part.devices() == {device}
                      else jax.device_put(part, device))
    parts.clear()
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _part(leaf: Any, full: tuple[slice, ...], dtype: Any, region: Callable, device: Any) -> Any:
    """One device part: numpy, or (a large part of a stack) a `jax.Array`
    assembled on ``device`` a layer at a time."""
    inner = leaf.value if isinstance(leaf, lazy.Cast) else leaf
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(full, leaf.shape))
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if not isinstance(inner, lazy.Stack) or nbytes < _ON_DEVICE_BYTES:
        return _region(leaf, full, region).astype(dtype, copy=False)
    import jax
    import jax.numpy as jnp

    ax = inner.axis
    rest = full[:ax] + full[ax + 1:]
    buf = jnp.zeros(shape, dtype, device=device)
    layers = range(*full[ax].indices(inner.shape[ax]))
    for k, layer in enumerate(_layers_read(inner, layers, rest, region)):
        buf = _put_layer(buf, layer.astype(dtype, copy=False), k, ax)
        del layer
    return jax.block_until_ready(buf)


def _layers_read(stack: lazy.Stack, layers: range, rest: tuple, region: Callable) -> Any:
    """Each layer's part ``rest`` of ``stack``, in order, a few read at once."""
    window = deque()
    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="ckptconv-layer") as pool:
        try:
            for j in layers:
                window.append(pool.submit(region, stack.parts[j], rest))
                if len(window) >= _WORKERS:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


_PUT = None


def _put_layer(buf: Any, layer: np.ndarray, k: int, axis: int) -> Any:
    """``buf`` with ``layer`` at index ``k`` of ``axis``, in place (donated)."""
    global _PUT
    if _PUT is None:
        import functools

        import jax

        @functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
        def put(b, x, i, a):
            return jax.lax.dynamic_update_index_in_dim(b, x, i, a)

        _PUT = put
    return _PUT(buf, layer, k, axis)
