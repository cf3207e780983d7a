"""What a checkpoint path holds: its items and the files around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """The shape of a checkpoint on disk.

    Attributes:
      format: ``msgpack`` or ``orbax``.
      kind: ``file`` (msgpack), ``item`` (one Orbax pytree directory),
        ``step`` (a CheckpointManager step directory of named items) or
        ``root`` (a CheckpointManager directory of numbered steps).
      path: the path given.
      step: for ``root``, the chosen step number.
      items: name -> path of each pytree item (``""`` for a lone item or file).
      others: paths copied unchanged (non-pytree items, metadata files), as
        ``(source, relative destination)``.
    """

    format: str
    kind: str
    path: Path
    step: int | None = None
    items: dict[str, Path] = field(default_factory=dict)
    others: list[tuple[Path, str]] = field(default_factory=list)

    def item_dest(self, name: str, out: Path) -> Path:
        """Where item ``name`` goes when the checkpoint is written to ``out``."""
        rel = self.items[name].relative_to(self.path)
        return out / rel
