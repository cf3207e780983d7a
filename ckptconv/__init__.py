"""ckptconv: convert Flax/JAX checkpoints between loop form (``layer_0 … layer_{N-1}``)
and scan form (one ``blocks`` subtree with a layer axis), and prove the result."""

from __future__ import annotations

from ckptconv.convert import Result, convert
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
from ckptconv.stack import to_scan
from ckptconv.unstack import Stacked, find_stacks, to_loop
from ckptconv.verify import Report, verify

__all__ = [
    "CkptconvError",
    "FormatError",
    "Group",
    "GroupError",
    "NearGroup",
    "NothingToConvertError",
    "OutputExistsError",
    "Report",
    "Result",
    "Spec",
    "Stacked",
    "VerifyError",
    "convert",
    "find_groups",
    "find_near_groups",
    "find_stacks",
    "load",
    "save",
    "to_loop",
    "to_scan",
    "verify",
]
