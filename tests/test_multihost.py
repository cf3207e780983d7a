"""``ckptconv.restore(like=...)`` as a two-process JAX program (``jax.distributed``
on localhost, 4 CPU devices each): each process reads only what its devices hold."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_restore_sharded_over_two_processes(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"params": {f"layer_{i}": {"w": rng.standard_normal((8, 12)).astype(np.float32),
                                      "b": rng.standard_normal(8).astype(np.float32)}
                       for i in range(3)}}
    ckpt = tmp_path / "loop"
    with ocp.StandardCheckpointer() as c:
        c.save(ckpt, tree)
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_restore_run.py"), str(ckpt),
                               coordinator, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]))
    finally:
        for p in procs:
            p.kill()
    assert sorted(o["process"] for o in outs) == [0, 1]
    for o in outs:
        assert (o["processes"], o["devices"], o["local_devices"]) == (2, 8, 4)
        assert o["same_sharding"] == o["leaves"] == 2
        assert o["equal_shards"] == o["shards"] == 4 * o["leaves"]
        # This process read exactly the distinct parts its devices hold: half
        # of every leaf (w is split over the processes on its 12-wide axis, b
        # over 'a' on its 8 rows), no more.
        assert o["elements_read"] == o["elements_held"] == o["elements_total"] // 2
    assert sum(o["elements_read"] for o in outs) == outs[0]["elements_total"]
