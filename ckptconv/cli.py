"""The ``ckptconv`` command. Thin: parse, call one library function, format.

Exit codes: 0 done (verify: equal within tolerance), 1 verify found a
difference, 2 bad usage or bad input.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ckptconv import errors, storage
from ckptconv import record as record_mod
from ckptconv import report as report_mod
from ckptconv.convert import convert as run_convert
from ckptconv.errors import CkptconvError, Terminated
from ckptconv.formats import FORMATS
from ckptconv.groups import parse_layers


class _Error(click.ClickException):
    exit_code = 2


@contextmanager
def _errors(ctx: click.Context):
    """Turn ckptconv's errors into ``Error: …`` and exit code 2 (a traceback with --debug)."""
    errors.completed.clear()  # this command's outputs only (several in one process: tests)
    try:
        yield
    except CkptconvError as e:
        if ctx.obj.get("debug"):
            raise
        raise _Error(str(e)) from None
    except (KeyboardInterrupt, Terminated) as e:
        if ctx.obj.get("debug"):
            raise
        _interrupted(e)
    except (click.exceptions.Exit, click.ClickException):
        raise
    except Exception as e:
        if ctx.obj.get("debug"):
            raise
        cause = _interrupt_behind(e)
        if cause is not None:
            # A signal broke what was running: a Ctrl-C while TensorStore's
            # extension module loads is "ImportError: initialization failed"
            # raised from the KeyboardInterrupt. The interrupt, not a bug.
            _interrupted(cause)
        # A bug, or an error of a library ckptconv does not know yet: still
        # one line (the output was removed by then), with the way to more.
        raise _Error(
            f"unexpected {type(e).__name__}: {e}. Nothing was written and the input is "
            "unchanged. This is a bug in ckptconv: rerun with --debug for the traceback, "
            "and report it."
        ) from None


def _interrupt_behind(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or `Terminated`) ``e`` was raised from, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        e = e.__cause__ or e.__context__
    return None


def _interrupted(e: BaseException) -> None:
    """Raise the one-line error for an interrupt (130, 143 for SIGTERM)."""
    # Work cut short leaves objects that complain when collected at exit
    # (an event loop's sockets, a coroutine never awaited, asyncio's "Task
    # exception was never retrieved" for the task the interrupt ended: a CI
    # run printed that after the one line): not news.
    import warnings

    warnings.filterwarnings("ignore")
    sys.unraisablehook = lambda *_: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    # A bucket output says what was deleted (`convert._bucket_output`).
    message = getattr(e, "ckptconv_message", None)
    if message is None:
        message = errors.completed_message()
    err = _Error(message or "interrupted; nothing was written and the input is unchanged.")
    err.exit_code = 143 if isinstance(e, Terminated) else 130
    raise err from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class _Progress:
    """A bytes/s progress bar on a terminal, created on the first update;
    nothing at all when stderr is not a terminal (piped, CI)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, n: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=self.label, file=sys.stderr, leave=False,
            )
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Command(click.Command):
    """A command whose options are given once, unless they are made to repeat
    (``--pattern``/``--into``, ``--from``): click keeps the last of a repeated
    option, which would silently drop what came before."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        once = {
            opt: p.name
            for p in self.params
            if isinstance(p, click.Option) and not p.multiple and not p.is_flag and not p.count
            for opt in p.opts
        }
        seen: dict[str, list[str]] = {}
        for a in args:
            if a == "--":
                break
            opt = a.split("=", 1)[0] if a.startswith("--") else a
            if opt in once:
                seen.setdefault(once[opt], []).append(opt)
        for uses in seen.values():
            if len(uses) > 1:
                raise click.UsageError(
                    f"{uses[0]} is given {len(uses)} times; give it once (only --pattern "
                    "with --into, and --from with --pattern, repeat).",
                    ctx,
                )
        return super().parse_args(ctx, args)


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="ckptconv")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Convert Flax checkpoints between loop form (layer_0 … layer_N-1) and
    scan form (one `blocks` subtree with a layer axis), and verify the result."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not debug:
        # Orbax logs through absl at WARNING for things ckptconv handles itself.
        logging.getLogger("absl").setLevel(logging.ERROR)


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--step", type=int, help="CheckpointManager step (default: latest).")
@click.option("--pattern", "patterns", multiple=True, help="Layer key template with {i}, as for to-scan (repeatable, paired with --into).")
@click.option("--into", "intos", multiple=True, help="Stacked key, as for to-scan (repeatable).")
@click.option("--period", type=click.IntRange(min=1), help="Blocks of K layers, as for to-scan / to-loop.")
@click.option("--layers", "layer_range", help="START:STOP, as for to-scan and to-loop.")
@click.option("--from", "source", help="Stacked key, as for to-loop (default: what the checkpoint's record says, else blocks).")
@click.option("--axis", type=int, help="Layer axis, as for to-loop (default: the record's, else 0).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def inspect(
    ctx: click.Context, ckpt: Path, step: int | None, patterns: tuple[str, ...],
    intos: tuple[str, ...], period: int | None, layer_range: str | None,
    source: str | None, axis: int | None, as_json: bool,
) -> None:
    """Show a checkpoint's format, tree and the groups to-scan / to-loop would convert.

    Reads metadata only, never array data.
    """
    ckpt = storage.as_path(ckpt)  # click's Path made gs://b/x into gs:/b/x
    with _errors(ctx):
        scan_opts = _scan_options(patterns, intos, period, layer_range, None)
        loop_pattern = patterns[0] if len(patterns) == 1 else None
        loop_opts = {"source": source or "blocks", "axis": axis or 0, "period": period,
                     "pattern": loop_pattern, "layers": parse_layers(layer_range)}
        recorded = None
        if not (patterns or intos or period or layer_range or source or axis is not None):
            # As to-loop (to-scan) with no options: the record's undo, if any.
            rec = record_mod.read(ckpt, step)
            if rec is not None and rec.get("command") == "to-scan" and rec.get("groups"):
                loop_opts = record_mod.undo_options(rec)
                recorded = f"to-loop with no options undoes it: {record_mod.options_text(loop_opts)}"
            elif rec is not None and rec.get("command") == "to-loop" and rec.get("groups"):
                scan_opts = record_mod.redo_options(rec)
                recorded = f"to-scan with no options undoes it: {record_mod.options_text(scan_opts)}"
            if recorded:
                recorded = f"record: written by ckptconv {rec['command']}; {recorded}"
        rep = report_mod.inspect(ckpt, step=step, scan_options=scan_opts, loop_options=loop_opts)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
        return
    kind = "sharded directory" if rep.kind == "item" and rep.format != "orbax" else rep.kind
    where = kind + (f", step {rep.step}" if rep.step is not None else "")
    click.echo(f"{rep.path}: {rep.format} ({where})")
    if recorded:
        click.echo(recorded)
    for it in rep.items:
        if it.name:
            click.echo(f"\nitem {it.name!r} ({it.path})")
        total = sum(r.count for r in it.leaves)
        click.echo(f"{total} leaves, {_human(it.nbytes)}")
        width = max((len(r.path) for r in it.leaves), default=10)
        for r in it.leaves:
            shape = "-" if r.shape is None else str(r.shape)
            times = f"  x{r.count}" if r.count > 1 else ""
            click.echo(
                f"  {r.path:<{width}}  {shape:<18} {r.dtype or '-':<9} {_human(r.nbytes):>9}{times}"
            )
        if it.to_scan and not it.to_scan_error:
            click.echo("to-scan would stack:")
            for g in it.to_scan:
                click.echo(f"  {g.describe()}")
        elif it.to_scan_error:
            click.echo(f"to-scan: cannot: {it.to_scan_error}")
        else:
            click.echo("to-scan: no layer groups")
        if not it.to_scan_error:  # (an error already names them)
            for n in it.near:
                click.echo(f"left alone: {n.message}")
        if it.to_loop:
            click.echo("to-loop would unstack:")
            for s in it.to_loop:
                click.echo(f"  {s.describe()}")
                under = "/".join(map(str, s.path)) + "/"
                wrapper = None if source or recorded or s.period else _wrapper_name(
                    {r.path[len(under):].split("/")[0] for r in it.leaves if r.path.startswith(under)})
                if wrapper is not None:
                    click.echo(
                        f"  note: it holds one subtree, {wrapper}, as nn.scan names the module it "
                        f"scans inside a wrapper module; --from {s.path[-1]}/{wrapper} unstacks "
                        "it without that level in each layer"
                    )
        elif it.to_loop_error:
            click.echo(f"to-loop: cannot: {it.to_loop_error}")
        elif it.to_loop_hint:
            click.echo(f"to-loop: {it.to_loop_hint}")
        else:
            click.echo(f"to-loop: no {loop_opts.get('source', 'blocks')!r} subtree")
        for line in it.known:
            click.echo(f"known layout: {line}")


def _scan_options(
    patterns: tuple[str, ...], intos: tuple[str, ...], period: int | None,
    layer_range: str | None, remainder: str | None,
) -> dict[str, Any]:
    """to-scan's options from the command line: repeated --pattern/--into pair up in order."""
    opts: dict[str, Any] = {
        "period": period, "layers": parse_layers(layer_range), "remainder": remainder,
    }
    if len(patterns) > 1 or len(intos) > 1:
        if len(patterns) != len(intos):
            raise CkptconvError(
                f"{len(patterns)} --pattern and {len(intos)} --into given: with several "
                "groups, give each --pattern its own --into, in order (--pattern "
                "'dense_layers_{i}' --into dense_layers --pattern 'moe_layers_{i}' --into "
                "moe_layers)."
            )
        opts["groups"] = list(zip(patterns, intos))
    else:
        opts["pattern"] = patterns[0] if patterns else None
        opts["into"] = intos[0] if intos else None
    return {k: v for k, v in opts.items() if v is not None}


def _loop_options(
    sources: tuple[str, ...], patterns: tuple[str, ...], period: int | None, layer_range: str | None,
) -> dict[str, Any]:
    """to-loop's options: repeated --from/--pattern pair up in order."""
    opts: dict[str, Any] = {"period": period, "layers": parse_layers(layer_range)}
    if len(sources) > 1 or len(patterns) > 1:
        if len(patterns) not in (0, len(sources)):
            raise CkptconvError(
                f"{len(sources)} --from and {len(patterns)} --pattern given: with several "
                "stacks, give each --from its own --pattern, in order."
            )
        pats = patterns or (None,) * len(sources)
        opts["stacks"] = list(zip(sources or ("blocks",), pats))
    else:
        # No --from: IN's record says how to undo its to-scan, else "blocks".
        opts["source"] = sources[0] if sources else None
        opts["pattern"] = patterns[0] if patterns else None
    return {k: v for k, v in opts.items() if v is not None}


def _selection_options(fn: Any) -> Any:
    fn = click.option(
        "--dtype", metavar="float32|bfloat16|float16",
        help="Cast floating leaves while streaming (round to nearest even); integer, boolean and PRNG-key leaves stay as they are.",
    )(fn)
    fn = click.option(
        "--root", metavar="PATH",
        help="Make this subtree OUT's root (an Orbax train state's params -> flax_model.msgpack).",
    )(fn)
    fn = click.option(
        "--copy", is_flag=True,
        help="Give OUT data files of its own (Orbax: IN's data files copied whole, in the kernel, as cp copies). By default an Orbax OUT shares IN's data files where it holds IN's chunks as they are (hard links; whole-file copies across filesystems): deleting either side is safe and nothing ever writes into a data file.",
    )(fn)
    fn = click.option(
        "--only", "only", multiple=True, metavar="PATH",
        help="Keep only this subtree, at its path, e.g. params (repeatable; '/' between keys); nothing else is read.",
    )(fn)
    return fn


def _process_options(fn: Any) -> Any:
    fn = click.option(
        "--process-id", "process_id", type=int, metavar="I",
        help="This process's id, 0 … N-1 (default: JAX_PROCESS_ID).",
    )(fn)
    fn = click.option(
        "--num-processes", "num_processes", type=int, metavar="N",
        help="Run as one of N processes of a jax.distributed program, each writing its share of OUT's leaves (default: JAX_NUM_PROCESSES; Orbax checkpoints: items, steps, manager roots; shared disk or buckets).",
    )(fn)
    fn = click.option(
        "--coordinator", metavar="HOST:PORT",
        help="Process 0's address for jax.distributed (default: JAX_COORDINATOR_ADDRESS).",
    )(fn)
    return fn


def _common_options(fn: Any) -> Any:
    fn = _selection_options(fn)
    fn = _process_options(fn)
    fn = click.option(
        "--like", "like", type=click.Path(path_type=Path), metavar="REF",
        help="A checkpoint in the target layout (e.g. MaxText's own of the same model in the other form): the options are worked out from it, and OUT must have its structure.",
    )(fn)
    fn = click.option("--dry-run", is_flag=True, help="Check and report; write nothing.")(fn)
    fn = click.option("--fsync", is_flag=True, help="Flush OUT to disk before renaming it into place (durable against power loss; slower).")(fn)
    fn = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(fn)
    fn = click.option("--step", type=int, help="CheckpointManager step (default: latest).")(fn)
    fn = click.option(
        "--format", "out_format", type=click.Choice(list(FORMATS)),
        help="Output format (default: OUT's suffix if .msgpack or .safetensors, else the input's).",
    )(fn)
    fn = click.option(
        "--axis-for", "axis_for", multiple=True, metavar="NAME=N",
        help="Layer axis of the groups under collection (or path) NAME, e.g. nnx_aux=0 (repeatable). By default --axis places the params' and their optimizer moments' layer axis, and other collections use 0.",
    )(fn)
    fn = click.option(
        "--axis", type=click.IntRange(min=0),
        help="Position of the layer axis of the params and their optimizer moments (default 0; MaxText: 1).",
    )(fn)
    return fn


def _run_convert(ctx: click.Context, src: Path, dst: str, to: str | None, **kw: Any) -> None:
    raw, src, dst = dst, storage.as_path(src), storage.as_path(dst)  # click's Path: gs:/b/x
    verb = {"scan": "stack", "loop": "unstack", None: "convert"}[to]
    dry_run = kw.get("dry_run", False)
    kw["only"] = list(kw.get("only") or ()) or None
    if "axis_for" in kw:
        kw["axis_for"] = list(kw["axis_for"]) or None
    names = (kw.pop("coordinator", None), kw.pop("num_processes", None), kw.pop("process_id", None))
    with _errors(ctx):
        from ckptconv import multihost

        names = multihost.options_from_env(*names)
        several = multihost.check_options(*names)
    if several:
        kw["distributed"] = dict(zip(("coordinator", "num_processes", "process_id"), names))
    else:
        kw["distributed"] = False  # one process: as ever, JAX not imported for it
    bar = _Progress(f"to-{to}" if to else "extract") if sys.stderr.isatty() else None
    start = time.perf_counter()
    try:
        with _errors(ctx):
            result = run_convert(src, raw, to=to, progress=bar, **kw)
    except click.ClickException as e:
        if not several:
            raise
        # A failed process of several leaves at once: JAX's exit handler
        # would wait (up to its 300 s shutdown timeout) for peers that may
        # be dead. The error was told to the others, the temporary removed.
        e.show()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.exit_code)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    if result.from_record:
        where = f"like {result.like}" if result.like else f"from {src}'s record"
        click.echo(f"{where}: to-{to} {record_mod.options_text(result.options)}")
    sel = result.selection
    if sel is not None and (sel.only or sel.root is not None):
        click.echo(sel.describe())
    for item in result.items:
        prefix = f"[{item.name}] " if item.name else ""
        if to is not None and not item.groups:
            copied = "copied" if sel is None else "written"
            click.echo(f"{prefix}nothing to {verb}; {copied} unchanged")
        for g in item.groups:
            if _in_root(g, sel):
                click.echo(f"{prefix}{g.describe()}")
            renamed = _hf_renamed(g) if to == "loop" else None
            if renamed is not None:
                click.echo(
                    f"{prefix}note: {renamed} looks like a Hugging Face layer list: if it is, "
                    f"transformers' from_pretrained reads its layers as {renamed}/0, {renamed}/1 "
                    "…, and would initialise layers named otherwise at random; --pattern '{i}' "
                    "(or none) gives that list."
                )
            wrapper = _scan_wrapper(item, g) if to == "loop" and not result.from_record else None
            if wrapper is not None and "source" not in kw and "stacks" not in kw:
                stack = "/".join(map(str, g.path))
                click.echo(
                    f"{prefix}note: each layer holds one subtree, {wrapper}, as nn.scan names the "
                    f"module it scans inside a wrapper module; if your loop model's layers hold "
                    f"what is in it directly, pass --from {g.path[-1]}/{wrapper} (unstacks "
                    f"{stack}/{wrapper} into the layers)."
                )
        for note in item.notes:
            click.echo(f"{prefix}left alone: {note}")
    cast = result.cast
    if cast is not None:
        click.echo(
            f"cast {cast.leaves} floating leaves to {cast.dtype.name}: "
            f"{_human(cast.before)} -> {_human(cast.after)} (saved {_human(cast.saved)})"
        )
    if dry_run:
        if to is not None:
            # The plan as options: what the record will say, and what reruns it.
            opts = {k: v for k, v in result.options.items() if k not in ("dry_run",)}
            click.echo(f"plan: to-{to} {record_mod.options_text(opts)}".rstrip())
        click.echo(f"dry run: would write {dst} ({result.out_format}, {_human(result.nbytes)}); nothing written")
    else:
        shards = ""
        if result.out_format != "orbax" and not storage.is_bucket(dst) and dst.is_dir():
            from ckptconv.formats import hf_index  # a Hugging Face sharded folder, as IN

            index = hf_index.find_index(dst, f".{result.out_format}")
            n = len(hf_index.read_index(index).shards) if index is not None else 0
            shards = f" in {n} shard{'s' if n != 1 else ''}" if n else ""
        click.echo(f"wrote {dst} ({result.out_format}{shards}, {_human(result.nbytes)}) in {elapsed:.1f} s")
    if result.left_out:
        click.echo(
            f"not in {dst}: {', '.join(result.left_out)} (not pytree items; a {result.out_format} "
            "file holds arrays only)"
        )
    inside = record_mod.root_in_stack(result) if to == "scan" else None
    if inside is not None:
        from ckptconv.tree import format_path

        click.echo(
            f"note: --root {'/'.join(map(str, result.selection.root))} is at or inside the stack "
            f"{format_path(inside.target)}: OUT holds stacked leaves without the layers' names, and "
            "to-loop cannot undo it from OUT alone; a --root above the stack (--root params) keeps "
            "it undoable."
        )
    if to == "scan" and not dry_run and inside is None:
        undo = _undo_command(result, dst)
        if undo:
            kept = _not_undone(sel, result.cast)
            if kept:
                click.echo(f"to undo the stacking: {undo} (it cannot undo {kept})")
            else:
                click.echo(f"to undo: {undo}")
        hf = _hf_lists(result)
        if hf:
            click.echo(
                f"note: {dst} holds Hugging Face layer lists in scan form ({', '.join(hf)}): "
                "transformers' from_pretrained does not read stacked layers and would initialise "
                "them at random. Load it into a scan model (ckptconv.restore(..., like=...)), or "
                "to-loop it back for transformers."
            )


def _hf_lists(result: Any) -> list[str]:
    """The Hugging Face layer lists (`ckptconv.known`) a to-scan stacked in place."""
    from ckptconv import known
    from ckptconv.tree import format_path

    return [
        format_path(g.path + (g.holder,)) for g in result.groups
        if g.holder is not None and known.is_hf_list(g.path + (g.holder,))
    ][:3]


def _hf_renamed(stack: Any) -> str | None:
    """A Hugging Face layer list (`ckptconv.known`) that a to-loop's pattern
    names other than the digit list transformers reads (``transformer/h`` into
    ``h_{i}``): the list's path."""
    from ckptconv import known
    from ckptconv.tree import format_path

    path = tuple(map(str, getattr(stack, "path", ())))
    pattern = getattr(stack, "pattern", None)
    if (known.is_hf_list(path) and pattern not in (None, "{i}", f"{path[-1]}/{{i}}")
            and not getattr(stack, "period", None)):
        return format_path(path)
    return None


def _scan_wrapper(item: Any, stack: Any) -> str | None:
    """The one key inside each layer a to-loop wrote, when it is nn.scan's
    auto-name for a scanned module (``ScanBlock_0``): the stack was one level
    further down, at ``blocks/ScanBlock_0``, than the default ``--from``."""
    from collections.abc import Mapping

    pattern = getattr(stack, "pattern", None)
    if getattr(stack, "period", None) or not pattern or item.out_tree is None:
        return None
    node = item.out_tree
    for key in (*stack.path[:-1], pattern.format(i=getattr(stack, "start", 0))):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return _wrapper_name(node) if isinstance(node, Mapping) else None


def _wrapper_name(keys: Any) -> str | None:
    """The one key of ``keys`` if it is nn.scan's auto-name (``ScanBlock_0``)."""
    import re

    keys = {str(k) for k in keys}
    if len(keys) == 1:
        (key,) = keys
        if re.fullmatch(r"Scan[A-Z]\w*_\d+", key):
            return key
    return None


def _in_root(group: Any, sel: Any) -> bool:
    """Whether a stack is in OUT: ``--root`` is taken after the conversion, and
    a stack outside it (an optimizer's moments beside ``--root params``) is
    left out with the rest. A to-scan group's stacked subtree, a to-loop
    stack's parent (where its layers go), must lie on the root's path."""
    if sel is None or sel.root is None:
        return True
    root = tuple(map(str, sel.root))
    target = getattr(group, "target", None)
    at = tuple(map(str, target if target is not None else group.path[:-1]))
    n = min(len(at), len(root))
    return at[:n] == root[:n]


def _not_undone(sel: Any, cast: Any) -> str:
    """The options of a to-scan that its undo (to-loop OUT) cannot reverse."""
    cut = []  # what --only / --root left out
    if sel is not None and sel.only:
        cut.append(" ".join("--only " + "/".join(map(str, p)) for p in sel.only))
    if sel is not None and sel.root is not None:
        cut.append("--root " + "/".join(map(str, sel.root)))
    words = cut + ([f"--dtype {cast.dtype.name}"] if cast is not None else [])
    if not words:
        return ""
    text = " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 2 else words)
    why = [f"OUT holds only what {'they' if len(cut) > 1 else 'it'} kept"] if cut else []
    why += ["its values stay as cast"] if cast is not None else []
    return f"{text}: {', and '.join(why)}"


def _undo_command(result: Any, dst: Path) -> str | None:
    """The to-loop command that gives the input's layer names back (what
    to-loop OUT also does with no options, from OUT's record)."""
    import shlex

    if not result.groups:
        return None
    opts = record_mod.undo_options(record_mod.build(result, result.options))
    args = ["ckptconv", "to-loop", shlex.quote(str(dst)), "LOOP_OUT"]
    # Defaults left out: a single stack named blocks, layers named layer_{i}.
    if opts.get("source") == "blocks":
        del opts["source"]
    if opts.get("pattern") == "layer_{i}":
        del opts["pattern"]
    text = record_mod.options_text(opts)
    if result.out_format != result.layout.format:
        fmt = f"--format {result.layout.format}"
        # --format goes after the --from/--pattern pairs, as before.
        head = record_mod.options_text({k: v for k, v in opts.items() if k in ("source", "pattern", "stacks")})
        tail = record_mod.options_text({k: v for k, v in opts.items() if k not in ("source", "pattern", "stacks")})
        text = " ".join(x for x in (head, fmt, tail) if x)
        if result.layout.kind in ("step", "root"):
            text += " (an Orbax item: OUT holds no CheckpointManager step)"
    return " ".join(args + ([text] if text else []))


@main.command("to-scan")
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path())  # a str: "out/" keeps its slash
@click.option("--pattern", "patterns", multiple=True, help="Layer key template with {i}, e.g. 'layers_{i}' (default: layer_/layers_/block_/blocks_/h_ and digit keys). Repeat it, each with its own --into, for several groups.")
@click.option("--into", "intos", multiple=True, help="Key of the stacked subtree, or a path (blocks/ScanBlock_0, as nn.scan in a wrapper module) (default: blocks; a digit-keyed list: its own key).")
@click.option("--period", type=click.IntRange(min=1), help="Stack blocks of K layers (MaxText scanned Gemma-3: 6): layer K*b+j -> INTO/<name_j>[b]; leftovers -> INTO_remainder.")
@click.option("--remainder", type=click.Choice(["separate", "extend"]), help="With --period: leftovers unstacked under INTO_remainder (separate, default, MaxText) or extending the first stacks (extend).")
@click.option("--layers", "layer_range", metavar="START:STOP", help="Stack only these layers (renumbered from 0); the others stay as they are.")
@_common_options
@click.pass_context
def to_scan(
    ctx: click.Context, src: Path, dst: str, out_format: str | None, patterns: tuple[str, ...],
    intos: tuple[str, ...], period: int | None, remainder: str | None, layer_range: str | None,
    **kw: Any,
) -> None:
    """Stack layer_0 … layer_N-1 subtrees of IN into one scanned subtree, write OUT."""
    with _errors(ctx):
        opts = _scan_options(patterns, intos, period, layer_range, remainder)
    _run_convert(ctx, src, dst, "scan", format=out_format, **opts, **kw)


@main.command("to-loop")
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path())  # a str: "out/" keeps its slash
@click.option("--from", "sources", multiple=True, help="Key of the stacked subtrees, or a path of lone keys (blocks/ScanBlock_0) (default: what IN's record says undoes its to-scan, else blocks). Repeat it, each with its own --pattern, for several stacks.")
@click.option("--pattern", "patterns", multiple=True, help="Layer key template with {i} (default: layer_{i}); '{i}' gives a digit-keyed list under the --from key, 'NAME/{i}' adds the layers to the list NAME.")
@click.option("--period", type=click.IntRange(min=1), help="The stacks hold blocks of K layers (the inverse of to-scan --period).")
@click.option("--layers", "layer_range", metavar="START:", help="Number the layers from START (the inverse of to-scan --layers).")
@_common_options
@click.pass_context
def to_loop(
    ctx: click.Context, src: Path, dst: str, out_format: str | None, sources: tuple[str, ...],
    patterns: tuple[str, ...], period: int | None, layer_range: str | None, **kw: Any,
) -> None:
    """Unstack every scanned subtree of IN into layer_0 … layer_N-1, write OUT."""
    with _errors(ctx):
        opts = _loop_options(sources, patterns, period, layer_range)
    _run_convert(ctx, src, dst, "loop", format=out_format, **opts, **kw)


@main.command()
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path())  # a str: "out/" keeps its slash
@_selection_options
@click.option("--dry-run", is_flag=True, help="Check and report; write nothing.")
@click.option("--fsync", is_flag=True, help="Flush OUT to disk before renaming it into place.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--step", type=int, help="CheckpointManager step (default: latest).")
@click.option(
    "--format", "out_format", type=click.Choice(list(FORMATS)),
    help="Output format (default: OUT's suffix if .msgpack or .safetensors, else the input's).",
)
@_process_options
@click.pass_context
def extract(ctx: click.Context, src: Path, dst: str, out_format: str | None, **kw: Any) -> None:
    """Write IN's --only subtrees (or its --root subtree), cast with --dtype,
    to OUT, with no layout change: a train state's params for serving."""
    _run_convert(ctx, src, dst, None, format=out_format, **kw)


def _shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected integers separated by commas, like 2,8,16") from None


@main.command()
@click.argument("loop", type=click.Path(path_type=Path))
@click.argument("scan", type=click.Path(path_type=Path))
@click.option("--pattern", "patterns", multiple=True, help="Layer key template with {i}, as given to to-scan (repeatable, paired with --into; default: SCAN's record, else layer_/layers_/… and digit keys).")
@click.option("--into", "intos", multiple=True, help="Stacked key, as given to to-scan (default: SCAN's record, else blocks).")
@click.option("--axis", type=click.IntRange(min=0), help="Layer axis, as given to to-scan (default: SCAN's record, else 0).")
@click.option("--layers", "layer_range", metavar="START:STOP", help="As given to to-scan.")
@click.option("--period", type=click.IntRange(min=1), help="Blocks of K layers, as given to to-scan (needs --model for the numbers).")
@click.option("--remainder", type=click.Choice(["separate", "extend"]), default="separate", show_default=True, help="With --period: as given to to-scan.")
@click.option("--block", help="MODULE:ATTR of a Flax module for ONE layer; runs both forms.")
@click.option("--block-kwargs", default="{}", help="JSON keyword arguments for --block (or --model).")
@click.option("--model", help="MODULE:ATTR of a function returning (loop_module, scan_module, inputs).")
@click.option("--input-shape", help="B,T,D of a random normal input for --block.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A .npy input for --block/--model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
@click.option("--atol", type=float, help="Absolute tolerance (default by dtype).")
@click.option("--rtol", type=float, help="Relative tolerance (default by dtype).")
@click.option("--precision", type=click.Choice(["highest", "default"]), default="highest", show_default=True, help="Float32 matmul precision of the compared runs: highest (full float32, whatever JAX's default) or default (JAX's default, the device's: TF32 on GPUs, bfloat16 passes on TPUs; default tolerances widen to match). Timings keep JAX's default.")
@click.option("--json", "json_dest", help="Write the whole report as JSON to PATH, or '-' for stdout.")
@click.option("--step", type=int, help="CheckpointManager step, of both (default: the latest of each, which must agree).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Draw layers x intermediates, colour = worst |diff| / tolerance, as PNG or SVG (by the suffix; needs matplotlib: pip install 'ckptconv[plot]').")
@click.option("--only", "only", multiple=True, metavar="PATH", help="As given to to-scan: LOOP's other subtrees are not compared (default: SCAN's record).")
@click.option("--root", metavar="PATH", help="As given to to-scan (default: SCAN's record).")
@click.option("--dtype", metavar="float32|bfloat16|float16", help="As given to to-scan: LOOP is cast the same way and both forms run on the cast params (default: SCAN's record).")
@click.pass_context
def verify(
    ctx: click.Context, loop: Path, scan: Path, patterns: tuple[str, ...], intos: tuple[str, ...],
    axis: int | None, layer_range: str | None,
    period: int | None, remainder: str, block: str | None, block_kwargs: str,
    model: str | None, input_shape: str | None, input_file: Path | None, seed: int, atol: float | None, rtol: float | None,
    precision: str, json_dest: str | None, step: int | None, plot_path: Path | None,
    only: tuple[str, ...], root: str | None, dtype: str | None,
) -> None:
    """Prove SCAN is the scan form of LOOP: structure bit for bit, then (with
    --block or --model) both forms run and every layer's intermediates are diffed.

    Exit code 0: equal within tolerance; 1: a difference; 2: bad input.
    """
    from ckptconv.verify import verify as run_verify

    loop, scan = storage.as_path(loop), storage.as_path(scan)

    try:
        kwargs = json.loads(block_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise click.BadParameter(f"{block_kwargs!r}: {e}", param_hint="--block-kwargs") from None
    shape = _shape(input_shape)
    with _errors(ctx):
        inputs = None
        if input_file is not None:
            import numpy as np

            inputs = (np.load(input_file),)
        pairs = _scan_options(patterns, intos, None, None, None)
        rep = run_verify(
            loop, scan, pattern=pairs.get("pattern"), into=pairs.get("into"),
            groups=pairs.get("groups"), axis=axis, period=period,
            remainder=remainder, block=block,
            block_kwargs=kwargs, model=model, inputs=inputs, input_shape=shape,
            seed=seed, atol=atol, rtol=rtol, step=step, layers=parse_layers(layer_range),
            plot=plot_path, precision=precision, only=list(only) or None, root=root, dtype=dtype,
        )
    if json_dest == "-":
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        click.echo(rep.table())
        if json_dest:
            Path(json_dest).write_text(json.dumps(rep.to_json(), indent=2) + "\n")
    ctx.exit(0 if rep.passed else 1)


def run() -> None:
    """The console script (kept for ``python -m ckptconv.cli``): see `ckptconv.__main__`."""
    from ckptconv.__main__ import run as start

    start()


if __name__ == "__main__":  # pragma: no cover
    run()
