"""The naive conversion every team writes: restore everything, stack, save.

    python bench/naive.py {orbax,msgpack} {to-scan,to-loop} IN OUT [--axis N]

Used by bench/convert_bench.py as the baseline; not part of ckptconv.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

LAYER = re.compile(r"^layer_(\d+)$")


def stack(tree, axis):
    if not isinstance(tree, dict):
        return tree
    keys = sorted((k for k in tree if LAYER.match(k)), key=lambda k: int(LAYER.match(k).group(1)))
    out = {k: stack(v, axis) for k, v in tree.items() if k not in keys}
    if keys:
        import jax

        out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs, axis), *[tree[k] for k in keys])
    return out


def unstack(tree, axis):
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack(v, axis) for k, v in tree.items() if k != "blocks"}
    if "blocks" in tree:
        import jax

        leaves, treedef = jax.tree.flatten(tree["blocks"])
        n = leaves[0].shape[axis]
        for i in range(n):
            out[f"layer_{i}"] = treedef.unflatten([np.take(x, i, axis) for x in leaves])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("format", choices=["orbax", "msgpack"])
    ap.add_argument("direction", choices=["to-scan", "to-loop"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--axis", type=int, default=0)
    a = ap.parse_args()
    fn = stack if a.direction == "to-scan" else unstack
    if a.format == "orbax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as c:
            tree = c.restore(a.src.absolute())
            c.save(a.dst.absolute(), fn(tree, a.axis))
    else:
        from flax import serialization

        tree = serialization.msgpack_restore(a.src.read_bytes())
        a.dst.write_bytes(serialization.msgpack_serialize(fn(tree, a.axis)))


if __name__ == "__main__":
    main()
