"""ckptconv: convert Flax/JAX checkpoints between loop form (``layer_0 … layer_{N-1}``)
and scan form (one ``blocks`` subtree with a layer axis), and prove the result."""

from __future__ import annotations

import sys
import types

# Not typing.TYPE_CHECKING: importing typing here would slow every start of
# the command (type checkers treat this name the same way).
TYPE_CHECKING = False

#: Where each public name lives. Imported on first use, so that starting the
#: ``ckptconv`` command (and its allocator re-exec) costs no imports it does
#: not need.
_EXPORTS = {
    "convert": "ckptconv.convert",
    "Result": "ckptconv.convert",
    "extract": "ckptconv.convert",
    "SelectionError": "ckptconv.subset",
    "CkptconvError": "ckptconv.errors",
    "FormatError": "ckptconv.errors",
    "GroupError": "ckptconv.errors",
    "NothingToConvertError": "ckptconv.errors",
    "OutputExistsError": "ckptconv.errors",
    "VerifyError": "ckptconv.errors",
    "Group": "ckptconv.groups",
    "NearGroup": "ckptconv.groups",
    "Spec": "ckptconv.groups",
    "find_groups": "ckptconv.groups",
    "find_near_groups": "ckptconv.groups",
    "load": "ckptconv.io",
    "save": "ckptconv.io",
    "to_scan": "ckptconv.stack",
    "Stacked": "ckptconv.unstack",
    "find_stacks": "ckptconv.unstack",
    "to_loop": "ckptconv.unstack",
    "RestoreError": "ckptconv.restore",
    "RestorePlan": "ckptconv.restore",
    "restore": "ckptconv.restore",
    "plan_restore": "ckptconv.restore",
    "Report": "ckptconv.verify",
    "verify": "ckptconv.verify",
}

if TYPE_CHECKING:
    from ckptconv.convert import Result, convert, extract
    from ckptconv.errors import (
        CkptconvError,
        FormatError,
        GroupError,
        NothingToConvertError,
        OutputExistsError,
        VerifyError,
    )
    from ckptconv.groups import Group, NearGroup, Spec, find_groups, find_near_groups
    from ckptconv.io import load, save
    from ckptconv.restore import RestoreError, RestorePlan, plan_restore, restore
    from ckptconv.stack import to_scan
    from ckptconv.subset import SelectionError
    from ckptconv.unstack import Stacked, find_stacks, to_loop
    from ckptconv.verify import Report, verify


class _Package(types.ModuleType):
    """This package's module type: ``ckptconv.convert`` and ``ckptconv.verify`` are
    the functions even though submodules of those names exist. Importing a
    submodule binds it on the package; the eager ``from … import`` of a usual
    ``__init__`` rebinds the function afterwards, and this does the same for the
    lazy one."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"ckptconv.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'ckptconv' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CkptconvError",
    "FormatError",
    "Group",
    "GroupError",
    "NearGroup",
    "NothingToConvertError",
    "OutputExistsError",
    "Report",
    "RestoreError",
    "RestorePlan",
    "Result",
    "SelectionError",
    "Spec",
    "Stacked",
    "VerifyError",
    "convert",
    "extract",
    "find_groups",
    "find_near_groups",
    "find_stacks",
    "load",
    "plan_restore",
    "restore",
    "save",
    "to_loop",
    "to_scan",
    "verify",
]
