"""One process of a two-process job for ``test_multihost_convert.py``.

    python tests/multihost_convert_run.py convert IN OUT COORDINATOR PROCESS_ID [TO]
    python tests/multihost_convert_run.py restore CKPT COORDINATOR PROCESS_ID

``convert``: ``ckptconv.convert(IN, OUT, to=TO, distributed={...})`` (the
library's way in). ``restore``: ``ckptconv.restore(CKPT, like=...)`` with
like the tree as stored, every leaf sharded over a 2x2 mesh whose first axis
spans the processes (``JAX_NUM_CPU_DEVICES=2``); prints one JSON line: how
many shards this process holds and how many equal the stored bytes.
"""

from __future__ import annotations

import json
import sys


def _convert(src: str, dst: str, coordinator: str, pid: int, to: str) -> None:
    import ckptconv

    ckptconv.convert(src, dst, to=to, distributed={
        "coordinator": coordinator, "num_processes": 2, "process_id": pid})
    print(json.dumps({"process": pid, "done": True}), flush=True)


def _restore(ckpt: str, coordinator: str, pid: int) -> None:
    import jax
    import numpy as np

    import ckptconv

    P = jax.sharding.PartitionSpec
    jax.distributed.initialize(coordinator, num_processes=2, process_id=pid)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))

    def spec(shape: tuple[int, ...]) -> P:
        dims: list[str | None] = [None] * len(shape)
        for name in ("a", "b"):
            for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
                if dims[d] is None and shape[d] % 2 == 0:
                    dims[d] = name
                    break
        return P(*dims)

    expected = ckptconv.load(ckpt)
    like = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                       sharding=jax.sharding.NamedSharding(mesh, spec(np.shape(a)))),
        expected)
    got = ckptconv.restore(ckpt, like=like)
    jax.block_until_ready(got)
    shards = equal = split = 0
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        e = np.asarray(e)
        split += a.ndim > 0 and not a.is_fully_addressable
        for shard in a.addressable_shards:
            shards += 1
            data = np.asarray(shard.data)
            # (0-d integers come back as JAX's default int without jax_enable_x64)
            same_dtype = data.dtype == e.dtype or (e.ndim == 0 and e.dtype.kind in "iu")
            equal += same_dtype and np.array_equal(data, e[shard.index])
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "leaves": len(jax.tree.leaves(got)), "shards": shards, "equal": equal,
                      "split": split}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        _convert(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        _restore(sys.argv[2], sys.argv[3], int(sys.argv[4]))
