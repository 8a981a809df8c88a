"""The config schema: type, range and allowed values of every key the code reads, checked right after composition.

``validate(cfg)`` walks the composed config against ``SCHEMA`` and raises ``ConfigError`` (one line: the key, the
bad value, what is allowed) before any stage runs. This module holds no defaults, just the rules: a group with a
typed config (``popstack.pipeline.config.group_schemas``) is ``Typed(<its dataclass>)`` here, and its rules and
defaults are the dataclass's; the other sections' defaults live in their YAML files.

Adding a key of a group is one ``setting(...)`` field of its dataclass; a top-level key of ``configs/train.yaml`` is
one line in ``SCHEMA`` below. A key neither lists is refused, so a typo never silently does nothing. ``trainer``
accepts every argument of ``lightning.Trainer`` except those the pipeline sets itself
(``PIPELINE_OWNED_TRAINER_ARGS``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from popstack.datamodules.config import DataConfig
from popstack.datamodules.folds import STRATEGIES as FOLD_STRATEGIES
from popstack.datamodules.typed import RULE
from popstack.features.config import FeatureConfig
from popstack.lightning_modules.backbone_config import BackboneConfig
from popstack.lightning_modules.registry import model_config_class
from popstack.pipeline.errors import UserError
from popstack.pipeline.settings import LoggerConfig, PathsConfig
from popstack.pipeline.stages import STAGE_NAMES
from popstack.stacking.config import StackConfig


class ConfigError(UserError):
    """A composed config value that the schema refuses."""


@dataclass(frozen=True)
class Spec:
    """Rule for one leaf: ``kind`` is int/float/str/bool/list/any; ``choices`` lists allowed values;
    ``lo``/``hi`` bound numbers (inclusive unless ``lo_open``); ``item`` checks each list element;
    ``check`` returns an error text (what is allowed) or None."""

    kind: str
    null: bool = False
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    item: "Spec | None" = None
    check: Callable[[Any], str | None] | None = None

    def allowed(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "list" and self.item is not None:
            text = f"a list of {self.item.allowed()}"
        else:
            text = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                    "list": "a list", "any": "any value"}[self.kind]
            if self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {self.lo:g}"
            if self.hi is not None:
                text += f" {'and ' if self.lo is not None else ''}<= {self.hi:g}"
        return text + (" or null" if self.null else "")

    def error(self, value: Any) -> str | None:
        """None when ``value`` fits, else what is allowed."""
        if value is None:
            return None if self.null else self.allowed()
        if self.choices is not None:
            return None if value in self.choices else self.allowed()
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str), "bool": isinstance(value, bool),
              "list": isinstance(value, (list, tuple)), "any": True}[self.kind]
        if not ok:
            return self.allowed()
        if self.kind in ("int", "float"):
            below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            if not math.isfinite(value) or below or (self.hi is not None and value > self.hi):
                return self.allowed()
        if self.kind == "list" and self.item is not None and any(self.item.error(v) for v in value):
            return self.allowed()
        return self.check(value) if self.check is not None else None


def Int(lo: float | None = None, hi: float | None = None, null: bool = False) -> Spec:
    return Spec("int", null=null, lo=lo, hi=hi)


def Num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, null: bool = False) -> Spec:
    return Spec("float", null=null, lo=lo, hi=hi, lo_open=lo_open)


def Str(null: bool = False) -> Spec:
    return Spec("str", null=null)


def Bool() -> Spec:
    return Spec("bool")


def OneOf(*choices: Any, null: bool = False) -> Spec:
    return Spec("any", null=null, choices=tuple(choices))


def ListOf(item: Spec, null: bool = False) -> Spec:
    return Spec("list", null=null, item=item)


ANY = Spec("any", null=True)


@dataclass(frozen=True)
class Typed:
    """A section whose keys, types, defaults and rules are one dataclass (``datamodules.typed.setting`` fields)."""

    cls: type

    def rules(self) -> dict:
        """key -> rule, from the dataclass's annotations and each field's ``setting`` metadata."""
        hints = typing.get_type_hints(self.cls)
        return {f.name: _rule_of(hints[f.name], f.metadata.get(RULE, {})) for f in dataclasses.fields(self.cls)
                if not f.metadata.get("omegaconf_ignore")}


def _rule_of(hint: Any, rule: dict) -> Any:
    """The Spec (or nested Typed) of one annotated field."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    null = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) < len(typing.get_args(hint))
    if null and len(args) == 1:
        hint, args = args[0], list(typing.get_args(args[0]))
    if dataclasses.is_dataclass(hint):
        return Typed(hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple, typing.List, typing.Tuple):
        item = _rule_of(args[0], {}) if args and args[0] is not Any else None
        return Spec("list", null=null, item=item, check=rule.get("check"))
    if origin in (dict, typing.Dict):
        return Spec("any", null=null, check=rule.get("check"))
    kind = {int: "int", float: "float", str: "str", bool: "bool"}.get(hint, "any")
    return Spec(kind, null=null, choices=rule.get("choices"), lo=rule.get("lo"), hi=rule.get("hi"),
                lo_open=rule.get("lo_open", False), check=rule.get("check"))


#: Trainer arguments the pipeline sets itself (per model, or from other keys): not settable under ``trainer``.
PIPELINE_OWNED_TRAINER_ARGS = ("logger", "callbacks", "plugins", "default_root_dir", "max_epochs",
                               "enable_progress_bar", "enable_checkpointing", "model_registry")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PRECISIONS = ("64", "32", "16", "bf16", "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
              "bf16-true", "bf16-mixed", "32-true", "64-true", 64, 32, 16)


def _callbacks_error(value: Any) -> str | None:
    """``callbacks``: a mapping of names to ``_target_`` entries (``lightning`` callbacks), or null entries (off)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return "a mapping of names to {_target_: <callback class>, ...} entries"
    bad = [k for k, v in value.items() if v is not None and not (isinstance(v, dict) and "_target_" in v)]
    return None if not bad else f"each entry a {{_target_: <callback class>, ...}} mapping or null (not: {bad})"


def _devices_error(value: Any) -> str | None:
    allowed = 'a positive integer, "auto", -1 (all), or a list of device indices'
    if value == "auto" or value == -1:
        return None
    if isinstance(value, bool):
        return allowed
    if isinstance(value, int):
        return None if value >= 1 else allowed
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 0 for v in value):
        return None
    if isinstance(value, str) and value.replace(",", "").strip().isdigit():
        return None
    return allowed


#: Typed rules for the Trainer arguments people set most; any other ``lightning.Trainer`` argument passes as is.
TRAINER_RULES = {
    "accelerator": OneOf(*ACCELERATORS), "devices": Spec("any", check=_devices_error), "num_nodes": Int(lo=1),
    "strategy": Str(), "precision": OneOf(*PRECISIONS), "deterministic": OneOf(True, False, "warn"),
    "log_every_n_steps": Int(lo=1), "gradient_clip_val": Num(lo=0, null=True),
    "gradient_clip_algorithm": OneOf("norm", "value", null=True), "accumulate_grad_batches": Int(lo=1),
    "max_time": ANY, "max_steps": Int(lo=-1), "min_epochs": Int(lo=0, null=True),
    "check_val_every_n_epoch": Int(lo=1, null=True), "num_sanity_val_steps": Int(lo=-1),
}


def trainer_arguments() -> tuple[str, ...]:
    """``lightning.Trainer``'s own arguments (from its signature) minus the pipeline-owned ones."""
    import lightning

    return tuple(n for n in inspect.signature(lightning.Trainer).parameters if n not in PIPELINE_OWNED_TRAINER_ARGS)


SCHEMA = {
    "name": Str(), "seed": Int(), "progress_bar": Bool(), "stages": ListOf(OneOf(*STAGE_NAMES)), "n_folds": Int(lo=2),
    "run_dir": Str(), "rank_wait_s": Num(lo=0, lo_open=True),
    "folds": {"strategy": OneOf(*FOLD_STRATEGIES), "holdout_fraction": Num(lo=0, hi=0.5)}, "paths": Typed(PathsConfig),
    "data": Typed(DataConfig), "backbone": Typed(BackboneConfig), "features": Typed(FeatureConfig),
    "model": Typed(model_config_class()), "stacking": Typed(StackConfig), "logger": Typed(LoggerConfig),
    "trainer": Spec("any"),
    "callbacks": Spec("any", check=lambda v: _callbacks_error(v)),
    "checks": {"label_abs_max": Num(lo=0, lo_open=True), "min_fit_posts": Int(lo=2),
               "disk_headroom": Num(lo=1)},
}
#: ``trainer`` is checked apart, last (``_check_trainer``): against ``lightning.Trainer``'s signature.


# ----------------------------------------------------------------------------- walking
def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={_show(value)} is not allowed: expected {allowed}")


def _unknown(key: str, names) -> ConfigError:
    return ConfigError(f"unknown config key {key}; allowed here: {', '.join(sorted(names))}")


def _check(node: Any, rule: Any, path: str) -> None:
    if isinstance(rule, Spec):
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
        allowed = rule.error(plain)
        if allowed is not None:
            raise _fail(path, node, allowed)
        return None
    if not isinstance(node, DictConfig):
        raise _fail(path, node, "a section (key: value mapping)")
    known = rule.rules() if isinstance(rule, Typed) else rule
    for key in node:
        sub = f"{path}.{key}" if path else str(key)
        if key in known:
            _check(node[key], known[key], sub)
        elif isinstance(rule, Typed) and "extra" in known:  # a library's parameters that the params do not name
            raise ConfigError(f"unknown config key {sub}; allowed here: {', '.join(sorted(known))} (another "
                              f"parameter of the library goes under {path}.extra: +{path}.extra.{key}=...)")
        else:
            raise _unknown(sub, known)
    across = getattr(rule.cls, "config_error", None) if isinstance(rule, Typed) else None
    if across is not None:  # a dataclass's rule across its keys
        error = across(OmegaConf.to_container(node, resolve=True))
        if error:
            raise ConfigError(f"{path}: {error}")
    return None


def _check_trainer(node: Any, path: str, hardware: bool = True) -> None:
    names = trainer_arguments()
    for key in node:
        sub = f"{path}.{key}"
        if key in PIPELINE_OWNED_TRAINER_ARGS:
            raise ConfigError(f"{sub} is set by the pipeline (per model or from other keys) and cannot be configured "
                              f"under trainer; e.g. epochs are model.<name>.epochs, the progress bar is progress_bar")
        if key not in names:
            raise ConfigError(f"unknown config key {sub}: not an argument of lightning.Trainer "
                              f"(allowed: {', '.join(names)})")
        if key in TRAINER_RULES:
            _check(node[key], TRAINER_RULES[key], sub)
    accel = node.get("accelerator")
    if accel in ("gpu", "cuda") and hardware:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{path}.accelerator={accel} is not allowed: this machine has no CUDA GPU; "
                              f"use trainer=cpu (or trainer.accelerator=cpu trainer.precision=32-true)")


def validate(cfg: DictConfig, hardware: bool = True) -> DictConfig:
    """Raise ``ConfigError`` for the first key of ``cfg`` the schema refuses; return ``cfg`` unchanged otherwise.
    ``hardware=False`` skips the check that a GPU accelerator has a GPU here (printing a config on a login node)."""
    _check(cfg, SCHEMA, "")
    _check_trainer(cfg.trainer, "trainer", hardware)  # last: it imports lightning and torch (the GPU check)
    return cfg
