"""ckptconv on Hugging Face layouts against the naive load-stack-save, and `cp -r`.

    python bench/hf_bench.py --gb 1.6 --layers 48 --workdir /work/bench_hf
    python bench/hf_bench.py --formats safetensors

Builds a loop-form checkpoint of the given size (``layers`` layers of
``--leaves`` float32 leaves, ``--width`` wide, random data):

- ``msgpack``: a sharded directory as ``save_pretrained`` writes it
  (``transformer/h/{i}/w{j}``, ``flax_model-0000K-of-0000N.msgpack`` shards of
  at most ``--shard-mb``, ``flax_model.msgpack.index.json``, ``config.json``);
- ``safetensors``: one ``model.safetensors`` file (``model.layers.{i}.w{j}``).

Then runs, each case in its own process under ``/usr/bin/time -v``: to-scan,
and to-loop of ckptconv's scan output, both with ckptconv and with the naive
way done with the format's own library (flax ``msgpack_restore``/``to_bytes``
shard by shard, merged; ``safetensors.numpy.load_file``/``save_file``), and
checks every ckptconv output leaf by leaf against the naive one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from convert_bench import CKPTCONV, PY, fresh, measure, row, same  # noqa: E402

SELF = [PY, str(Path(__file__).resolve())]
INDEX = "flax_model.msgpack.index.json"


def layer_arrays(gb: float, layers: int, leaves: int, width: int, seed: int = 0):
    cols = max(1, int(gb * 1e9 / (layers * leaves * width * 4)))
    rng = np.random.default_rng(seed)
    for i in range(layers):
        yield i, {f"w{j}": rng.standard_normal((width, cols), dtype=np.float32) for j in range(leaves)}


# --------------------------------------------------------------------------- naive


def shard_greedy(flat: dict, max_size: int) -> list[dict]:
    """``flax_shard_checkpoint``'s greedy fill."""
    blocks, current = [{}], 0
    for k, v in flat.items():
        if blocks[-1] and current + v.nbytes > max_size:
            blocks.append({})
            current = 0
        blocks[-1][k] = v
        current += v.nbytes
    return blocks


def save_sharded_msgpack(flat: dict, folder: Path, max_size: int, like: Path | None) -> None:
    from flax.serialization import to_bytes
    from flax.traverse_util import unflatten_dict

    folder.mkdir()
    blocks = shard_greedy(flat, max_size)
    weight_map = {}
    for i, block in enumerate(blocks):
        name = f"flax_model-{i + 1:05d}-of-{len(blocks):05d}.msgpack"
        (folder / name).write_bytes(to_bytes(unflatten_dict(block, sep="/")))
        weight_map.update(dict.fromkeys(block, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in flat.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if like is not None:
        shutil.copy2(like / "config.json", folder / "config.json")


def naive_msgpack(direction: str, src: Path, dst: Path) -> None:
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    index = json.loads((src / INDEX).read_text())
    flat, largest = {}, 0
    for name in sorted(set(index["weight_map"].values())):
        part = flatten_dict(msgpack_restore((src / name).read_bytes()), sep="/")
        largest = max(largest, sum(v.nbytes for v in part.values()))
        flat.update(part)
    out = {}
    if direction == "to-scan":
        layer = re.compile(r"^transformer/h/(\d+)/(.*)$")
        groups: dict[str, dict[int, np.ndarray]] = {}
        for k, v in flat.items():
            m = layer.match(k)
            if m:
                groups.setdefault(m.group(2), {})[int(m.group(1))] = v
            else:
                out[k] = v
        for name, by_i in groups.items():
            out[f"transformer/h/{name}"] = np.stack([by_i[i] for i in range(len(by_i))])
    else:
        for k, v in flat.items():
            if k.startswith("transformer/h/"):
                rest = k[len("transformer/h/") :]
                for i in range(v.shape[0]):
                    out[f"transformer/h/{i}/{rest}"] = v[i]
            else:
                out[k] = v
    save_sharded_msgpack(out, dst, largest, src)


def naive_safetensors(direction: str, src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file, save_file

    flat = load_file(src)
    out = {}
    if direction == "to-scan":
        layer = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
        groups: dict[str, dict[int, np.ndarray]] = {}
        for k, v in flat.items():
            m = layer.match(k)
            if m:
                groups.setdefault(m.group(2), {})[int(m.group(1))] = v
            else:
                out[k] = v
        for name, by_i in groups.items():
            out[f"model.layers.{name}"] = np.stack([by_i[i] for i in range(len(by_i))])
    else:
        for k, v in flat.items():
            if k.startswith("model.layers."):
                rest = k[len("model.layers.") :]
                for i in range(v.shape[0]):
                    out[f"model.layers.{i}.{rest}"] = np.ascontiguousarray(v[i])
            else:
                out[k] = v
    save_file(out, dst, metadata={"format": "flax"})


# --------------------------------------------------------------------------- cases


def build(fmt: str, work: Path, args: argparse.Namespace) -> Path:
    if fmt == "msgpack":
        src = work / "gpt_loop"
        if not src.exists():
            flat = {}
            for i, arrays in layer_arrays(args.gb, args.layers, args.leaves, args.width):
                flat.update({f"transformer/h/{i}/{k}": v for k, v in arrays.items()})
            flat["transformer/wte/embedding"] = np.ones((64, args.width), np.float32)
            save_sharded_msgpack(flat, src, int(args.shard_mb * 1e6), None)
            (src / "config.json").write_text(json.dumps({"n_layer": args.layers}) + "\n")
        return src
    src = work / "loop.safetensors"
    if not src.exists():
        from safetensors.numpy import save_file

        flat = {"model.embed_tokens.embedding": np.ones((64, args.width), np.float32)}
        for i, arrays in layer_arrays(args.gb, args.layers, args.leaves, args.width):
            flat.update({f"model.layers.{i}.{k}": v for k, v in arrays.items()})
        save_file(flat, src, metadata={"format": "flax"})
    return src


def run_format(fmt: str, work: Path, args: argparse.Namespace) -> None:
    src = build(fmt, work, args)
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"\n{fmt}: {src} {size / 1e9:.2f} GB on disk in {len(files)} files, {args.layers} layers")
    print(f"{'case':<34} {'tool':<10} {'wall':>10} {'peak RSS':>12}  of naive")
    ext = ".safetensors" if fmt == "safetensors" else ""
    loop_opts = ["--from", "h" if fmt == "msgpack" else "layers", "--pattern", "{i}"]

    def case(name: str, source: Path, direction: str) -> Path:
        slug = re.sub(r"\W+", "_", name)
        out_n = fresh(work / f"{slug}_naive{ext}")
        naive = measure([*SELF, "naive", fmt, direction, str(source), str(out_n)])
        row(name, "naive", *naive, None)
        out_c = fresh(work / f"{slug}_ckptconv{ext}")
        opts = loop_opts if direction == "to-loop" else []
        wall, rss = measure([*CKPTCONV, direction, str(source), str(out_c), *opts])
        ok = "same as naive" if same(out_c, out_n) else "DIFFERS FROM NAIVE"
        row(name, "ckptconv", wall, rss, naive, ok)
        fresh(out_n)
        return out_c

    cp_out = fresh(work / f"cp{ext}")
    row("copy of the input", "cp -r", *measure(["cp", "-r", str(src), str(cp_out)]), None)
    fresh(cp_out)
    scan = case(f"{fmt} to-scan", src, "to-scan")
    back = case(f"{fmt} to-loop (ckptconv's scan)", scan, "to-loop")
    print(f"round trip equal to the input: {same(back, src)}")
    for p in (scan, back, src):
        fresh(p)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "naive":
        _, _, fmt, direction, src, dst = sys.argv
        (naive_msgpack if fmt == "msgpack" else naive_safetensors)(direction, Path(src), Path(dst))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.6)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--leaves", type=int, default=7)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--shard-mb", type=float, default=200, help="max_shard_size of the msgpack input")
    ap.add_argument("--formats", default="msgpack,safetensors")
    ap.add_argument("--workdir", type=Path, default=HERE / "out_hf")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; workdir {args.workdir}")
    try:
        for fmt in args.formats.split(","):
            run_format(fmt, args.workdir, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
