"""Property tests: to-scan then to-loop gives back the input, bit for bit.

Random trees: layer groups ``layer_0 … layer_{N-1}`` (N from 1; ``pattern=
"layer_{i}"`` so that a single layer is a group) at depths 1-3, each layer a
small dict of arrays of one structure, with dtypes including bfloat16, int8 and
bool, 0-d arrays and zero-size arrays; a stacking axis from 0 to the smallest
ndim in the group; other leaves beside the groups. In memory (`to_scan` /
`to_loop`) and through every file format (`save` → `convert` to scan →
`convert` to loop → `load`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptconv

DTYPES = [
    np.dtype(np.float32),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.int8),
    np.dtype(np.bool_),
    np.dtype(np.float16),
    np.dtype(np.int32),
    np.dtype(np.uint8),
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(np.complex64),
]

_KEYS = st.text("abcdefghijkmnopqrstuvwxyz", min_size=1, max_size=4).filter(
    lambda k: not k.startswith("layer") and k != "blocks"
)


def _array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    # Random bits: NaN payloads, -0.0, subnormals, all of it must survive.
    raw = rng.integers(0, 256, int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@st.composite
def _template(draw, depth: int, low: int = 0) -> dict:
    """A layer's structure: {key: (shape, dtype) or a sub-template}."""
    keys = draw(st.lists(_KEYS, min_size=1, max_size=3, unique=True))
    out = {}
    for k in keys:
        if depth > 1 and draw(st.booleans()):
            out[k] = draw(_template(depth - 1, low))
        else:
            shape = tuple(draw(st.lists(st.integers(low, 3), max_size=3)))
            out[k] = (shape, draw(st.sampled_from(DTYPES)))
    return out


def _leaves(template: dict):
    for v in template.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def _fill(template: dict, rng: np.random.Generator) -> dict:
    return {
        k: _fill(v, rng) if isinstance(v, dict) else _array(rng, *v) for k, v in template.items()
    }


@st.composite
def trees(draw, extras: bool = True, zero_size: bool = True):
    """(tree, axis): a tree with a layer group, all stackable on ``axis``.

    ``zero_size=False``: no dimension is 0 (Orbax refuses zero-size arrays).
    """
    low = 0 if zero_size else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    template = draw(_template(draw(st.integers(1, 2)), low))
    n = draw(st.integers(1, 4))
    axis = draw(st.integers(0, min(len(s) for s, _ in _leaves(template))))
    group = {f"layer_{i}": _fill(template, rng) for i in range(n)}
    # The group sits at depth 1-3 of the tree (1: the root holds the layers).
    depth = draw(st.integers(1, 3))
    path = draw(st.lists(_KEYS, min_size=depth - 1, max_size=depth - 1, unique=True))
    tree: dict = {}
    node = tree
    for k in path:
        node[k] = {}
        node = node[k]
        if extras and draw(st.booleans()):
            # Something beside the group, at this level, that is not converted.
            shape = tuple(draw(st.lists(st.integers(low, 3), max_size=2)))
            node["other" if k != "other" else "misc"] = _array(rng, shape, draw(st.sampled_from(DTYPES)))
    node.update(group)
    if extras and draw(st.booleans()):
        tree["embed"] = _array(rng, (2, 3), np.dtype(np.float32))
    return tree, axis


def assert_identical(got, want, where="<root>", scalar_ok=False):
    """Same containers, keys in the same order, same dtypes, shapes and bits.

    ``scalar_ok``: a numpy scalar stands for a 0-d array (see
    `test_in_memory_0d_layers_stay_arrays`).
    """
    if scalar_ok and isinstance(got, np.generic) and isinstance(want, np.ndarray) and want.ndim == 0:
        got = np.asarray(got)
    assert type(got) is type(want) or (isinstance(got, np.ndarray) and isinstance(want, np.ndarray)), (
        f"{where}: {type(got).__name__} != {type(want).__name__}"
    )
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_identical(got[k], want[k], f"{where}/{k}", scalar_ok)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: {len(got)} != {len(want)} items"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_identical(g, w, f"{where}/{i}", scalar_ok)
    elif isinstance(want, np.ndarray):
        got = np.asarray(got)
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        assert got.tobytes() == want.tobytes(), f"{where}: the bytes differ"
    else:
        assert got == want or (got != got and want != want), f"{where}: {got!r} != {want!r}"


def _sorted(tree):
    """The tree with every dict's keys sorted (what a format that sorts keys gives)."""
    if isinstance(tree, dict):
        return {k: _sorted(tree[k]) for k in sorted(tree)}
    return tree


# --------------------------------------------------------------------------- in memory


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_in_memory_roundtrip(case):
    tree, axis = case
    scan = ckptconv.to_scan(tree, pattern="layer_{i}", axis=axis)
    loop = ckptconv.to_loop(scan, axis=axis)
    # to_loop puts the layers where the stack was: compare key sets in order
    # of the input's keys, leaf by leaf, bit for bit.
    assert_identical(_reorder(loop, tree), tree, scalar_ok=True)


def test_in_memory_0d_layers_stay_arrays():
    """Found by test_in_memory_roundtrip: 0-d layers stacked on axis 0 came back from
    to_loop as numpy scalars (``x[i]`` of a 1-d array), not 0-d arrays, as the file
    writers keep them (msgpack_stream.write's docstring)."""
    tree = {"layer_0": {"a": np.array(1.0, np.float32)}}
    loop = ckptconv.to_loop(ckptconv.to_scan(tree, pattern="layer_{i}"))
    assert isinstance(loop["layer_0"]["a"], np.ndarray)


@settings(max_examples=60, deadline=None)
@given(trees(), st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.floats(allow_nan=True))
def test_in_memory_roundtrip_keeps_other_leaves(case, value):
    """Non-array leaves beside the groups (None, ints, strings, floats) are kept as they are."""
    tree, axis = case
    key = "zz"
    while key in tree:  # a generated key of that name holds the layers: keep them
        key += "_"
    tree[key] = value
    scan = ckptconv.to_scan(tree, pattern="layer_{i}", axis=axis)
    assert_identical(_reorder(ckptconv.to_loop(scan, axis=axis), tree), tree, scalar_ok=True)


def _reorder(got, like):
    """``got`` with each dict's keys in ``like``'s order (only where both have the same keys)."""
    if isinstance(like, dict) and isinstance(got, dict) and set(got) == set(like):
        return {k: _reorder(got[k], like[k]) for k in like}
    return got


# --------------------------------------------------------------------------- through files

# What each format can store, and so what its trees hold:
# - msgpack: everything here (flax's own format); keys come back sorted, as
#   flax's msgpack_serialize sorts them.
# - orbax: everything but zero-size arrays, which Orbax refuses to save
#   ("Cannot save arrays with zero size"); keys come back in Orbax's order.
# - safetensors: only arrays (no None, no empty containers, no Python values:
#   a 0-d array and a scalar are one thing there), names joined with '.', and
#   no complex128 / float8_e4m3b11fnuz; the trees drawn hold arrays only, of
#   dtypes in DTYPES (all of which safetensors has), so nothing is skipped but
#   the non-array leaves, which `trees` does not draw.


def _through(fmt: str, tree, axis: int, tmp) -> object:
    ext = {"msgpack": ".msgpack", "orbax": "", "safetensors": ".safetensors"}[fmt]
    src, scan, loop = (tmp / f"{n}{ext}" for n in ("src", "scan", "loop"))
    ckptconv.save(tree, src, format=fmt, force=True)
    ckptconv.convert(src, scan, to="scan", pattern="layer_{i}", axis=axis, force=True)
    ckptconv.convert(scan, loop, to="loop", axis=axis, force=True)
    return ckptconv.load(loop)


def _check_file(fmt: str, case, tmp_path_factory):
    tree, axis = case
    tmp = tmp_path_factory.mktemp(fmt)
    got = _through(fmt, tree, axis, tmp)
    assert_identical(_sorted(got), _sorted(tree))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=trees())
def test_msgpack_roundtrip(case, tmp_path_factory):
    _check_file("msgpack", case, tmp_path_factory)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=trees())
def test_safetensors_roundtrip(case, tmp_path_factory):
    _check_file("safetensors", case, tmp_path_factory)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=trees(zero_size=False))
def test_orbax_roundtrip(case, tmp_path_factory):
    _check_file("orbax", case, tmp_path_factory)
