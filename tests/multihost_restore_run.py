"""One process of a two-process ``ckptconv.restore(like=...)`` (``test_multihost.py`` runs two).

    python tests/multihost_restore_run.py CKPT COORDINATOR PROCESS_ID

Each process has 4 CPU devices (``JAX_NUM_CPU_DEVICES=4``); together they form
a 2x4 mesh whose first axis ("a") spans the processes. The like is the scan
form of CKPT's loop tree, each leaf sharded by the rule in `_spec`. One JSON
line on stdout: what this process read, and whether every shard it holds has
the bytes of the in-memory conversion.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import ckptconv
from ckptconv.formats import orbax as orbax_format

P = jax.sharding.PartitionSpec


def _spec(shape: tuple[int, ...]) -> P:
    """The layer axis (0) unsharded; the largest other axis on "a" (across
    the processes) and the next on "b" (within one), where they divide."""
    dims: list[str | None] = [None] * len(shape)
    for name, n in (("a", 2), ("b", 4)):
        for d in sorted(range(1, len(shape)), key=lambda d: -shape[d]):
            if dims[d] is None and shape[d] % n == 0:
                dims[d] = name
                break
    return P(*dims)


def main(ckpt: str, coordinator: str, pid: int) -> None:
    jax.distributed.initialize(coordinator, num_processes=2, process_id=pid)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    expected = ckptconv.to_scan(ckptconv.load(ckpt))
    like = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=jax.sharding.NamedSharding(mesh, _spec(a.shape))),
        expected)
    reads: list[int] = []
    own = orbax_format.read_region

    def counted(item, ref, index):
        part = own(item, ref, index)
        reads.append(part.size)
        return part

    orbax_format.read_region = counted
    try:
        got = ckptconv.restore(ckpt, like=like)
        jax.block_until_ready(got)
    finally:
        orbax_format.read_region = own
    shards = equal = same_sharding = 0
    held = 0  # elements of the distinct parts this process's devices hold
    for a, e, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected), jax.tree.leaves(like)):
        same_sharding += a.sharding.is_equivalent_to(w.sharding, a.ndim)
        parts = {}
        for shard in a.addressable_shards:
            shards += 1
            equal += np.array_equal(np.asarray(shard.data), e[shard.index])
            parts[tuple((s.start, s.stop) for s in shard.index)] = shard.data.size
        held += sum(parts.values())
    print(json.dumps({
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "leaves": len(jax.tree.leaves(got)),
        "same_sharding": same_sharding,
        "shards": shards,
        "equal_shards": equal,
        "elements_read": sum(reads),
        "elements_held": held,
        "elements_total": sum(a.size for a in jax.tree.leaves(got)),
    }), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
