"""Advice when SCAN does not look like ``to_scan(LOOP)``: stacks found elsewhere
than the options say, and a ``--block`` that lives outside the stacked layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckptconv import tree as treelib
from ckptconv.errors import GroupError, VerifyError
from ckptconv.groups import Group, find_groups
from ckptconv.stack import to_scan
from ckptconv.unstack import find_stacks
from ckptconv.verify.intermediates import _get
from ckptconv.verify.run import _listed, _shapes
from ckptconv.verify.sides import _Side


def _has_stacks(t: Any, into: str | None, axis: int, period: int | None, pattern: str | None) -> bool:
    try:
        return bool(find_stacks(t, into or "blocks", axis=axis, period=period, pattern=pattern or "layer_{i}"))
    except GroupError:
        return False


def _stack_elsewhere(L: _Side, S: _Side, opts: dict[str, Any], axis: int) -> str | None:
    """With to-scan's defaults assumed (no options, no record), SCAN holding
    LOOP's one layer group stacked under another key than the default: that
    key, if it is the only such key and its leaves are those of to_scan(LOOP)
    (same paths and shapes). Raises `VerifyError` where such a key is there
    but ambiguous or of other shapes (a usage error, not a wrong conversion);
    None where there is none (check_structure reports what differs)."""
    try:
        groups = find_groups(L.tree, **opts)
        if len(groups) != 1 or groups[0].period or _get(S.tree, groups[0].target) is not None:
            return None
        expected = to_scan(L.tree, axis=axis, **opts)  # lazy: nothing is read
    except GroupError:
        return None
    g = groups[0]
    stack = _shapes(_get(expected, g.target))
    here, there = _get(S.tree, g.path), _get(expected, g.path)
    if not (stack and isinstance(here, Mapping) and isinstance(there, Mapping)):
        return None
    same_leaves = [k for k, v in here.items() if k not in there and set(_shapes(v)) == set(stack)]
    if not same_leaves:
        return None
    at = " and ".join(treelib.format_path(g.path + (k,)) for k in same_leaves)
    head = (
        f"{S.name} (SCAN) has no {treelib.format_path(g.target)} stack (to-scan's default "
        f"--into {g.into}, assumed because SCAN has no conversion record)"
    )
    members = treelib.format_path(g.members_path)
    if len(same_leaves) > 1:
        raise VerifyError(
            f"{head}; {at} each hold the leaves of LOOP's {members} stacked: pass --into "
            "with the one SCAN was converted to."
        )
    (key,) = same_leaves
    if _shapes(here[key]) != stack:
        raise VerifyError(
            f"{head}; it has {at}, with the leaves of LOOP's {members} in other shapes: "
            f"pass --into {key} and the --axis it was converted with (MaxText: 1)."
        )
    return key


def _path_to(tree: Any, node: Any, depth: int = 2) -> tuple | None:
    """The keys from ``tree`` to ``node`` (the same object), ``depth`` at most."""
    if tree is node:
        return ()
    if depth and isinstance(tree, Mapping):
        for k, v in tree.items():
            p = _path_to(v, node, depth - 1)
            if p is not None:
                return (k, *p)
    return None


def _block_outside(
    L: _Side, S: _Side, variables: dict[str, Any], scan_vars: dict[str, Any], g: Group,
    axis: int, block: Any, block_kwargs: dict[str, Any] | None,
    input_shape: Sequence[int] | None, inputs: Any, dtype: np.dtype | None = None,
) -> VerifyError | None:
    """``--block`` builds the layer stack only: where LOOP's variables hold
    more than ``g``'s layers (an embedding, a head), the error that says so,
    with the commands that verify the stack alone where they can be written."""
    import json
    import shlex

    layer_keys = [g.path + ((g.holder, k) if g.template == "{i}" else (k,)) for k in g.keys]
    outside = [
        f"{treelib.format_path((coll, *p))} {list(shape)}"
        for coll in ("params", "batch_stats")
        for p, shape in _shapes(variables.get(coll, {})).items()
        if not any(p[: len(k)] == k for k in layer_keys)
    ]
    if not outside:
        return None
    few = ", ".join(x.split(" ")[0] for x in outside[:3]) + (", …" if len(outside) > 3 else "")
    lines = [
        f"--block runs only the layer stack ({g.num_layers} layers, "
        f"{treelib.format_path(('params', *g.members_path))} in LOOP, "
        f"{treelib.format_path(('params', *g.target))} in SCAN), but {L.name} (LOOP) also "
        f"has {len(outside)} params outside those layers ({few}), which it does not run: give "
        "--model MOD:FN, a function returning (loop_module, scan_module, inputs) of the whole "
        "model (README: \"The `--model` contract\"), or verify the layer stack alone."
    ]
    lines += _listed("outside the layers", outside)
    lp = _path_to(L.tree, variables.get("params"))
    sp = _path_to(S.tree, scan_vars.get("params"))
    if (
        L.path is not None and S.path is not None and g.template != "{i}" and lp == sp
        and lp in ((), ("params",), ("params", "params"))
    ):
        root = lp + g.path
        tail = ["--root", "/".join(map(str, root))] if g.path else []
        loop_cmd = ["ckptconv", "extract", str(L.path), "loop_layers.msgpack"]
        for k in g.keys:
            loop_cmd += ["--only", "/".join(map(str, root + (k,)))]
        if dtype is not None:  # SCAN was cast: the loop layers are cast alike
            loop_cmd += ["--dtype", dtype.name]
        scan_cmd = ["ckptconv", "extract", str(S.path), "scan_layers.msgpack",
                    "--only", "/".join(map(str, lp + g.target))]
        target = block if isinstance(block, str) else f"{block.__module__}:{block.__qualname__}"
        run = ["ckptconv", "verify", "loop_layers.msgpack", "scan_layers.msgpack",
               "--pattern", g.template, "--into", str(g.into)]
        run += ["--axis", str(axis)] if axis else []
        run += ["--block", target]
        run += ["--block-kwargs", json.dumps(block_kwargs)] if block_kwargs else []
        if inputs is not None:
            run += ["--input", "FILE.npy"]
        elif input_shape is not None:
            run += ["--input-shape", ",".join(map(str, input_shape))]
        lines.append("  The layer stack alone, as --block runs it:")
        for cmd in (loop_cmd + tail, scan_cmd + tail, run):
            lines.append("    " + " ".join(shlex.quote(w) for w in cmd))
    return VerifyError("\n".join(lines))
