"""Typed configs: each Hydra group's settings are one dataclass, the single place of their defaults and their rules.

A field is ``name: type = setting(default, lo=..., hi=..., choices=..., check=...)``. The pipeline stores every
group's dataclass as ``<group>/schema`` in Hydra's ConfigStore (``popstack.pipeline.config``), so composing checks
types and refuses unknown keys, and the group's YAML files hold only what differs from the dataclass
(``defaults: [schema, _self_]``). ``popstack.pipeline.schema`` checks every composed value against the field's
rule and names the key in a one-line error. Code reads the composed values, never a default of its own.

This room is the base every other room imports; it imports neither Hydra nor the pipeline.
"""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any, Callable

#: The metadata key under which a field carries its rule.
RULE = "popstack_rule"


def setting(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            choices: tuple | None = None, check: Callable[[Any], str | None] | None = None):
    """A dataclass field with ``default`` and its rule: numbers within [``lo``, ``hi``] (``lo_open``: > lo),
    a value among ``choices``, or ``check(value)`` returning what is allowed (None when the value fits).
    Lists and dicts are copied for each instance."""
    rule = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": None if choices is None else tuple(choices),
            "check": check}
    metadata = {RULE: {k: v for k, v in rule.items() if v is not None and v is not False}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)
