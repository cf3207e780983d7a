"""Layouts of tools ckptconv knows (MaxText, Hugging Face Flax), recognised
from a tree's keys, with the command that converts each to its other form.

`inspect` prints these proposals; they are the options the field tests run
against the tools themselves (tests/field), so a proposal is a tested command.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Hugging Face Flax layer lists: (parent key, list key) as save_pretrained writes them.
HF_LISTS = {"h", "layer", "layers", "block"}
#: The top-level keys of Hugging Face Flax models' params (GPT-2, Llama, BERT, T5 …).
HF_ROOTS = ("transformer", "model", "bert", "encoder", "decoder", "roberta", "resnet")


def is_hf_list(path: Any) -> bool:
    """Whether ``path`` names a Hugging Face layer list (``transformer/h``,
    ``bert/encoder/layer``): a list key under a Hugging Face root key."""
    return len(path) >= 2 and str(path[0]) in HF_ROOTS and str(path[-1]) in HF_LISTS


def _child(node: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def _numbered(node: Mapping, prefix: str) -> int:
    return sum(1 for k in node if str(k).startswith(prefix) and str(k)[len(prefix):].isdigit())


def _maxtext(tree: Any) -> list[str]:
    decoder = _child(tree, "params", "params", "decoder")
    if not isinstance(decoder, Mapping):
        return []
    has_state = isinstance(tree, Mapping) and "opt_state" in tree
    what = "MaxText train state" if has_state else "MaxText params"
    out = []
    stacks = [k for k in ("layers", "dense_layers", "moe_layers") if isinstance(decoder.get(k), Mapping)]
    loops = [p for p in ("layers_", "dense_layers_", "moe_layers_") if _numbered(decoder, p) >= 2]
    if loops:
        pairs = " ".join(f"--pattern '{p}{{i}}' --into {p[:-1]}" for p in loops)
        n = max(_numbered(decoder, p) for p in loops)
        out.append(
            f"{what}, loop form ({n} layers): its scan form (scan_layers=true, "
            f"param_scan_axis 1) is: ckptconv to-scan IN OUT {pairs} --axis 1"
        )
    if stacks:
        args = []
        period = None
        for k in stacks:
            sub = decoder[k]
            k_sub = _numbered(sub, "layers_")
            if k_sub and k_sub == len(sub):
                period = k_sub  # blocks of K layers (Gemma-3, Llama-4)
            args.append(f"--from {k} --pattern '{k}_{{i}}'" if k != "layers" or len(stacks) > 1
                        else "--from layers --pattern 'layers_{i}'")
        extra = f" --period {period}" if period else ""
        out.append(
            f"{what}, scan form: its loop form (scan_layers=false) is: ckptconv to-loop IN OUT "
            f"{' '.join(args)}{extra} --axis 1"
        )
    if out:
        out.append(
            "or give MaxText's own checkpoint of the same model in the other form as --like REF"
            + (" (with --only params --only opt_state --only step: the RNG state in nnx_aux "
               "differs between MaxText's two forms)" if has_state and "nnx_aux" in tree else "")
        )
    return out


def _hf(tree: Any, stackable: set[str] | None) -> list[str]:
    out = []

    def walk(node: Any, path: tuple, depth: int) -> None:
        if not isinstance(node, Mapping) or depth > 4:
            return
        for k, v in node.items():
            if str(k) in HF_LISTS and isinstance(v, Mapping) and v:
                where = "/".join(map(str, path + (k,)))
                if all(str(c).isdigit() for c in v):
                    if len(v) >= 2 and (stackable is None or where in stackable):
                        out.append(
                            f"Hugging Face layer list {where} ({len(v)} layers): "
                            f"ckptconv to-scan IN OUT stacks it in place; to-loop OUT LOOP "
                            f"--from {k} --pattern '{{i}}' gives it back"
                        )
                    continue
                if not any(str(c).isdigit() for c in v) and path and str(path[0]) in HF_ROOTS:
                    out.append(
                        f"{where} looks like a stacked Hugging Face layer list: ckptconv to-loop "
                        f"IN OUT --from {k} --pattern '{{i}}' (from_pretrained loads the result)"
                    )
                    continue
            walk(v, path + (k,), depth + 1)

    walk(tree, (), 0)
    return out[:4]


def propose(tree: Any, stackable: set[str] | None = None) -> list[str]:
    """What this tree looks like, and the command for its other form.

    ``stackable``: the paths of the digit-keyed lists default to-scan stacks
    (`ckptconv.find_groups`); a list not among them (T5's, whose block 0
    differs) gets no in-place proposal.
    """
    return _maxtext(tree) or _hf(tree, stackable)
