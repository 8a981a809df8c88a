"""The Hydra config (groups in ``configs/``): composed from overrides, made final, saved into the run directory.

``train.py`` runs under ``@hydra.main`` (launcher and sweeper plugins, ``--cfg``, ``--info``, ``.hydra/``); it first
composes every job here with the compose API (``compose_config``) so that a bad value ends in one clear line
before anything is written, and tests call ``compose_config([...])`` exactly as the command line composes.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

import popstack.configs
from popstack.datamodules.atomic import atomic_write_text
from popstack.pipeline.layout import RunLayout

CONFIG_DIR = Path(popstack.configs.__file__).resolve().parent
RUN_DIR_ENV = "POPSTACK_RUN_DIR"


def group_schemas() -> dict[str, type]:
    """Hydra group -> the typed config holding its defaults and rules (``datamodules.typed``)."""
    from popstack.datamodules.config import DataConfig
    from popstack.features.config import FeatureConfig
    from popstack.lightning_modules.backbone_config import BackboneConfig
    from popstack.lightning_modules.registry import model_config_class
    from popstack.pipeline.settings import LoggerConfig, PathsConfig
    from popstack.stacking.config import StackConfig

    return {"data": DataConfig, "features": FeatureConfig, "backbone": BackboneConfig, "model": model_config_class(),
            "stacking": StackConfig, "logger": LoggerConfig, "paths": PathsConfig}


def register_schemas() -> None:
    """Store each group's typed config as ``<group>/schema`` in Hydra's ConfigStore (before any compose): the
    group's YAML files start from it (``defaults: [schema, _self_]``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, node in group_schemas().items():
        store.store(group=group, name="schema", node=node)


def trainer_overrides(overrides: list[str]) -> list[str]:
    """``trainer.<arg>=v`` -> ``++trainer.<arg>=v``: any Trainer argument is settable without a ``+`` prefix
    (the schema then refuses names that are not ``lightning.Trainer`` arguments)."""
    return [f"++{o}" if o.startswith("trainer.") and "=" in o else o for o in overrides]


def compose_config(overrides: list[str], config_name: str = "train", validate: bool = True,
                   hardware: bool = True) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides``, fix ``run_dir`` (from ``hydra.run.dir``) and check
    the result against ``pipeline.schema`` (nothing is written).

    Raises hydra's ``HydraException`` subclasses for unknown groups or malformed overrides and
    ``pipeline.schema.ConfigError`` for values the schema refuses.
    """
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=trainer_overrides(list(overrides)), return_hydra_config=True)
    with open_dict(cfg):
        hydra_run_dir = cfg.hydra.run.dir
        del cfg["hydra"]
    return finish_config(cfg, hydra_run_dir, validate=validate, hardware=hardware)


def finish_config(cfg: DictConfig, hydra_run_dir: str, validate: bool = True, hardware: bool = True) -> DictConfig:
    """A composed config (without its ``hydra`` node) made final: ``run_dir`` fixed (the config's, else the one a
    first process published, else ``hydra_run_dir``), resolved, checked against ``pipeline.schema``
    (``hardware=False``: no GPU check). ``train.py``'s Hydra task and ``compose_config`` both end here."""
    # DDP launchers re-run the command line in child processes: they must land in the same run directory,
    # not in a new ${now:...} one, so the first process publishes its run directory in the environment.
    run_dir = cfg.run_dir or os.environ.get(RUN_DIR_ENV) or hydra_run_dir
    with open_dict(cfg):
        cfg.run_dir = str(Path(run_dir).resolve())
    OmegaConf.resolve(cfg)
    if validate:
        from popstack.pipeline.schema import validate as check

        check(cfg, hardware=hardware)
    return cfg


def sweep_dir(overrides: list[str], config_name: str = "train") -> Path:
    """The multirun directory (``hydra.sweep.dir``) of one job's overrides, resolved once for the whole sweep."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=trainer_overrides(list(overrides)), return_hydra_config=True)
    return Path(OmegaConf.select(cfg, "hydra.sweep.dir")).resolve()


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config into the run directory, so inference needs only the run directory.

    ``run_dir`` is saved as ``.`` (the directory holding the file): a moved or copied run stays self-contained.
    """
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    saved.run_dir = "."
    path, text = RunLayout(Path(run_dir)).config, OmegaConf.to_yaml(saved)
    try:
        if path.read_text() == text:
            return path  # unchanged: not rewritten
    except (OSError, UnicodeDecodeError):
        pass
    return atomic_write_text(path, text)


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The saved config of a run, with ``run_dir`` set to where the run directory is now."""
    path = RunLayout(Path(run_dir)).config
    if not path.is_file():
        from popstack.pipeline.errors import UserError

        raise UserError(f"{run_dir} is not a popstack run directory: {path.name} not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax, bad UTF-8, a folder named config.yaml
        from popstack.pipeline.errors import UserError

        raise UserError(f"{path}: not a readable config ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(cfg, DictConfig):
        from popstack.pipeline.errors import UserError

        raise UserError(f"{path}: not a config mapping")
    cfg.run_dir = str(Path(run_dir).resolve())
    return cfg
