"""Running the two model forms: a ``--block``/``--model`` target resolved, its
variables taken from the checkpoint and checked against the module's own params,
and the compared and timed runs (`_run`)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptconv import tree as treelib
from ckptconv.errors import VerifyError
from ckptconv.verify.precision import COMPARED_COMPILE, _keep, _precision_scope
from ckptconv.verify.report import Timing


def resolve(target: str) -> Any:
    """``"package.module:attr"`` -> the object."""
    mod, sep, attr = target.partition(":")
    if not sep or not mod or not attr:
        raise VerifyError(
            f"{target!r}: expected MODULE:ATTR, for example ckptconv.models:NormAttentionBlock."
        )
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise VerifyError(f"{target!r}: cannot import {mod!r} ({e}). Is it on PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise VerifyError(f"{target!r}: module {mod!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


#: Collections a variables dict holds (MaxText's train state keeps one under ``params``).
_COLLECTIONS = {"params", "batch_stats", "cache", "params_axes"}


def _variables(t: Any, items: bool = False) -> dict[str, Any]:
    """The model variables in a checkpoint tree: its collections if it has
    ``params`` at the top (optimizer state and the rest left out; MaxText's
    ``params/params/…``: the variables dict under ``params``); for a
    CheckpointManager step (``{item: tree}``), those of the one item that has
    ``params``, or its lone item (``items``: a step's items at the top, one
    converted with ``--root params``); else the whole tree as params."""
    if items and isinstance(t, Mapping) and len(t) == 1:
        return _variables(next(iter(t.values())))
    if isinstance(t, Mapping) and "params" in t:
        inner = t["params"]
        if isinstance(inner, Mapping) and "params" in inner and set(inner) <= _COLLECTIONS:
            return {k: inner[k] for k in ("params", "batch_stats", "cache") if k in inner}
        return {k: t[k] for k in ("params", "batch_stats", "cache") if k in t}
    if isinstance(t, Mapping):
        items = [v for v in t.values() if isinstance(v, Mapping) and "params" in v]
        if len(items) == 1:
            return _variables(items[0])
    return {"params": t}


def _is_array(x: Any) -> bool:
    import jax

    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(isinstance(v, (np.ndarray, np.generic, jax.Array)) for v in leaves)


@dataclass
class _Call:
    """How the models are called: positional and keyword inputs. Arrays (and
    pytrees of arrays) are traced; anything else (``deterministic=True``, a
    mode string) is passed as it is, a static argument."""

    args: tuple
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, inputs: Any) -> _Call:
        if isinstance(inputs, Mapping):
            return cls((), dict(inputs))
        if isinstance(inputs, (tuple, list)):
            return cls(tuple(inputs), {})
        return cls((inputs,), {})

    def dynamic(self) -> tuple[list, dict]:
        return (
            [a for a in self.args if _is_array(a)],
            {k: v for k, v in self.kwargs.items() if _is_array(v)},
        )

    def __call__(self, fn: Callable[..., Any], dyn: tuple[list, dict]) -> Any:
        pos, kw = iter(dyn[0]), dyn[1]
        args = [next(pos) if _is_array(a) else a for a in self.args]
        return fn(*args, **{**self.kwargs, **kw})


def _run(
    module: Any, variables: Any, call: _Call, repeats: int, form: str, precision: str
) -> tuple[Any, Timing | None]:
    """Time the plain forward (compile, then steps) at the caller's precision,
    then run once capturing every intermediate at ``precision``. Timing the
    plain forward keeps the figures about the model, not about copying out its
    intermediates.

    The capturing run is lowered and compiled explicitly inside the precision
    scope (the setting acts when a function is traced), from a function made
    for this call, so no jit cache hands back one traced at another precision,
    and with `COMPARED_COMPILE` (16-bit floats rounded at every op)."""
    import jax

    def plain(v: Any, dyn: Any) -> Any:
        return call(lambda *a, **k: module.apply(v, *a, mutable=True, **k), dyn)

    def captured(v: Any, dyn: Any) -> Any:
        return call(
            lambda *a, **k: module.apply(v, *a, capture_intermediates=True, mutable=True, **k), dyn
        )

    dyn = call.dynamic()
    timing = None
    if repeats > 0:  # else no timing: one compile (of the capturing run) instead of two
        start = time.perf_counter()
        lowered = jax.jit(plain).lower(variables, dyn)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(variables, dyn))
        start = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(compiled(variables, dyn))
        timing = Timing(compile_s, (time.perf_counter() - start) / repeats)
        _keep(f"{form} step", lowered)
    with _precision_scope(precision):
        lowered = jax.jit(captured).lower(variables, dyn)
        _keep(form, lowered)
        out = jax.device_get(lowered.compile(compiler_options=COMPARED_COMPILE)(variables, dyn))
    return out, timing


def _first_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _listed(title: str, items: list[str], n: int = 5) -> list[str]:
    if not items:
        return []
    out = [f"  {title} ({len(items)}):"]
    out += [f"    {x}" for x in items[:n]]
    if len(items) > n:
        out.append(f"    … and {len(items) - n} more")
    return out


def _shapes(tree: Any) -> dict[tuple, tuple]:
    """path -> shape of every array leaf (boxed leaves unboxed)."""
    return {
        p: tuple(s) for p, x in treelib.leaves_with_paths(tree)
        if (s := treelib.leaf_shape(x)) is not None
    }


def _check_params(form: str, module: Any, variables: dict[str, Any], call: _Call, ckpt: str) -> str | None:
    """Why ``module`` cannot run on ``variables`` (the checkpoint's), or None:
    the paths its ``init`` creates against those the checkpoint holds
    (``jax.eval_shape``: nothing is computed). None too when ``init`` itself
    cannot be traced: running will say what is wrong."""
    import jax
    from flax.core import meta

    def init(key: Any, dyn: Any) -> Any:
        rngs = {"params": key, "dropout": key}
        return call(lambda *a, **k: module.init(rngs, *a, **k), dyn)

    try:
        made = jax.eval_shape(init, jax.random.PRNGKey(0), call.dynamic())
    except Exception:  # noqa: BLE001 - the run reports it, with its own message
        return None
    made = meta.unbox(dict(made))
    missing, unexpected, shape = [], [], []
    for coll in ("params", "batch_stats"):
        if coll not in made and coll not in variables:
            continue
        want = _shapes(made.get(coll, {}))
        have = _shapes(variables.get(coll, {}))
        for p, s in want.items():
            name = treelib.format_path((coll, *p))
            if p not in have:
                missing.append(f"{name} {list(s)}")
            elif have[p] != s:
                shape.append(f"{name}: the model's {list(s)}, the checkpoint's {list(have[p])}")
        unexpected += [f"{treelib.format_path((coll, *p))} {list(s)}" for p, s in have.items() if p not in want]
    if not (missing or unexpected or shape):
        return None
    lines = [
        f"the {form} model ({type(module).__name__}) does not fit {ckpt}: "
        f"{len(missing)} params missing from the checkpoint, {len(unexpected)} not in the "
        f"model, {len(shape)} of another shape."
    ]
    lines += _listed("missing from the checkpoint", missing)
    lines += _listed("in the checkpoint, not in the model", unexpected)
    lines += _listed("shape", shape)
    lines.append(
        "  Does --model/--block build this checkpoint's form (layer names, stacked key, "
        "layer axis, --period, sizes in --block-kwargs)?"
    )
    return "\n".join(lines)
