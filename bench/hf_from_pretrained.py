"""Round trips of real Hugging Face Flax checkpoints through ckptconv, checked by transformers.

    /path/to/hfenv/bin/python bench/hf_from_pretrained.py

Needs ``transformers`` (4.57.x, the last line with Flax models) and ckptconv installed in the
same environment. For GPT-2 and Llama (tiny configs, no hub access), each saved three ways by
``save_pretrained`` (plain ``flax_model.msgpack``, sharded msgpack, ``model.safetensors``):
``ckptconv to-scan``, then the ``to undo:`` command it prints, then ``from_pretrained`` on the
result. Prints one line per case: max |Δ| of the logits against the original model, whether the
round trip's leaves equal the input's, and whether every stacked leaf equals ``np.stack`` of
its layers (read with flax / safetensors, not with ckptconv). Exit code 1 if anything differs.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import transformers as T
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

CKPTCONV = str(Path(sys.executable).with_name("ckptconv"))
MODELS = {  # name: (class, config, the digit-keyed layer list)
    "gpt2": (
        T.FlaxGPT2LMHeadModel,
        T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32),
        ("transformer", "h"),
    ),
    "llama": (
        T.FlaxLlamaForCausalLM,
        T.LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=32,
        ),
        ("model", "layers"),
    ),
}
LAYOUTS = {  # name: (save_pretrained kwargs, what ckptconv is given inside the saved folder)
    "plain": ({}, "flax_model.msgpack"),
    "sharded": ({"max_shard_size": "20KB"}, ""),
    "safetensors": ({"safe_serialization": True}, "model.safetensors"),
}
IDS = (np.arange(10, dtype=np.int32)[None] % 60) + 1


def read(path: Path) -> dict[tuple[str, ...], np.ndarray]:
    """A checkpoint as {key path: array}, without ckptconv."""
    if path.is_dir():
        index = json.loads(next(path.glob("*.index.json")).read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read(path / shard))
        return out
    if path.suffix == ".safetensors":
        return {tuple(k.split(".")): v for k, v in load_file(path).items()}
    return flatten_dict(msgpack_restore(path.read_bytes()))


def ckptconv(cmd: str) -> str:
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {cmd}\n{p.stdout}{p.stderr}")
    return p.stdout + p.stderr


def stacked_ok(loop: dict, scan: dict, lst: tuple[str, ...]) -> bool:
    """Every leaf under the stacked list equals np.stack of the loop layers' leaves."""
    n = 1 + max(int(k[len(lst)]) for k in loop if k[: len(lst)] == lst)
    rest = {k[len(lst) + 1 :] for k in loop if k[: len(lst)] == lst}
    return all(
        np.array_equal(scan[lst + r], np.stack([loop[lst + (str(i),) + r] for i in range(n)]))
        and scan[lst + r].dtype == loop[lst + ("0",) + r].dtype
        for r in rest
    ) and not any(k[: len(lst)] == lst and k[len(lst)].isdigit() for k in scan)


def case(tmp: Path, name: str, layout: str) -> bool:
    cls, config, lst = MODELS[name]
    kwargs, inner = LAYOUTS[layout]
    model = cls(config, seed=1)  # not from_pretrained's seed 0: a missing weight changes logits
    saved = tmp / f"{name}_{layout}"
    model.save_pretrained(saved, **kwargs)
    src = saved / inner if inner else saved
    scan = tmp / f"{name}_{layout}_scan{src.suffix}"
    back = tmp / f"{name}_{layout}_back"
    out = ckptconv(f"{shlex.quote(CKPTCONV)} to-scan {src} {scan}")
    undo = next(line for line in out.splitlines() if line.startswith("to undo: ckptconv "))
    loop_out = back / inner if inner else back
    if inner:  # a single file: from_pretrained wants it in a folder with config.json
        back.mkdir()
        shutil.copy(saved / "config.json", back)
    ckptconv(
        undo.replace("to undo: ckptconv", shlex.quote(CKPTCONV)).replace("LOOP_OUT", str(loop_out))
    )

    original, stacked, restored = read(src), read(scan), read(loop_out)
    same_tree = original.keys() == restored.keys() and all(
        np.array_equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype
        for k in original
    )
    stack_ok = stacked_ok(original, stacked, lst)
    delta = float(
        np.max(
            np.abs(
                np.asarray(cls.from_pretrained(back)(input_ids=IDS).logits)
                - np.asarray(model(input_ids=IDS).logits)
            )
        )
    )
    ok = delta == 0 and same_tree and stack_ok
    print(
        f"{name:6s} {layout:12s} logits max|Δ| {delta:g}  round trip equal: {same_tree}  "
        f"scan == np.stack: {stack_ok}  {'ok' if ok else 'DIFFERS'}  ({undo[9:].split(' LOOP_OUT ')[1]})",
        flush=True,
    )
    return ok


def main() -> int:
    print(f"transformers {T.__version__}; {CKPTCONV}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [case(Path(tmp), name, layout) for name in MODELS for layout in LAYOUTS]
    print("all ok" if all(results) else f"{results.count(False)} case(s) differ")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
