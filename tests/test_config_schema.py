"""Bad configs end before any stage runs: one ``error:`` line naming the key, the value and what is allowed; exit 2."""

from __future__ import annotations

import time

import pytest

# (override(s), the key the message must name, the bad value it must show)
BAD_CONFIGS = [
    (["stacking.blend=foo"], "stacking.blend", "foo"),
    (["+stacking.members.no_such_member.depth=3"], "stacking.members.no_such_member", "no_such_member"),
    (["stacking.selection_member=no_such_member"], "stacking.selection_member", "no_such_member"),
    (["stacking.members.lightgbm.num_leaves=1"], "stacking.members.lightgbm.num_leaves", "1"),
    (["stacking.members.catboost.learning_rate=fast"], "stacking.members.catboost.learning_rate", "fast"),
    (["+stacking.members.lightgbm.extra.alpha=2"], "stacking.members.lightgbm", "alpha"),
    (["model.prompt_prototype.lr=abc"], "model.prompt_prototype.lr", "abc"),
    (["n_folds=1"], "n_folds", "1"),
    (["seed=abc"], "seed", "abc"),
    (["trainer.devices=0"], "trainer.devices", "0"),
    (["data.text_field=foo"], "data.text_field", "foo"),
    (["trainer=gpu"], "trainer.accelerator", "gpu"),
    (["model.co_attention.epochs=-1"], "model.co_attention.epochs", "-1"),
    (["+trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", "-1"),
    (["trainer.no_such_flag=1"], "trainer.no_such_flag", "no_such_flag"),
    (["trainer.max_epochs=3"], "trainer.max_epochs", "max_epochs"),
    (["model.no_such_key=1"], "model.no_such_key", "no_such_key"),
    (["logger.wandb.mode=sometimes"], "logger.wandb.mode", "sometimes"),
    (["stages=[prepare,fly]"], "stages", "fly"),
    (["backbone=vit_h99"], "backbone", "vit_h99"),
]


@pytest.mark.parametrize("overrides,key,value", BAD_CONFIGS, ids=[c[0][0] for c in BAD_CONFIGS])
def test_bad_config_is_one_error_line_before_anything_runs(overrides, key, value, tmp_path, capsys, monkeypatch):
    import lightning  # noqa: F401  (imports are paid once per process; the check itself is what is timed)
    import torch

    from popstack.commands.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU case reads the same on every machine
    start = time.perf_counter()
    rc = main(["debug=fast", f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", *overrides])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert key in lines[0] and value in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a refused config must write nothing"
    assert seconds < 15


def test_gpu_trainer_without_gpu_names_the_cpu_override(tmp_path, capsys, monkeypatch):
    import torch

    from popstack.commands.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["debug=fast", f"paths.root_dir={tmp_path}", "trainer.accelerator=cuda"]) == 2
    assert "use trainer=cpu" in capsys.readouterr().err


def test_every_allowed_value_of_the_shipped_configs_passes():
    """The schema accepts what the YAML files ship (each experiment, trainer and logger): defaults and rules agree."""
    from popstack.pipeline.config import compose_config
    from popstack.pipeline.schema import validate

    for overrides in (["experiment=smpd", "data.root=/data"], ["experiment=hyperfusion", "data.root=/data"],
                      ["experiment=cmpa_dgpl", "data.root=/data"], ["trainer=ddp"], ["logger=wandb"], ["logger=none"],
                      ["debug=fast"], ["data.synthetic.naming=2020", "data.synthetic.user_variant=B"]):
        validate(compose_config([*overrides, "trainer.accelerator=cpu"], validate=False))  # ConfigError if refused


def test_stack_config_defaults_are_the_group():
    """One source of defaults: the composed ``stacking`` group (no experiment overlay) is ``StackConfig()``, and the
    stack stage builds exactly that from it."""
    import dataclasses

    from omegaconf import OmegaConf

    from popstack.pipeline.config import compose_config
    from popstack.pipeline.stages.stack import stack_config
    from popstack.stacking.config import StackConfig

    cfg = compose_config(["~experiment"])
    composed = OmegaConf.to_container(cfg.stacking, resolve=True)
    default = dataclasses.asdict(StackConfig())
    assert composed == {k: v for k, v in default.items() if k not in ("neural_columns", "seed")}
    assert stack_config(cfg, ["pred_x"]) == dataclasses.replace(StackConfig(), neural_columns=["pred_x"],
                                                                seed=cfg.seed)


def test_schema_refuses_unknown_keys_and_adding_one_is_one_line():
    from dataclasses import make_dataclass

    from omegaconf import OmegaConf

    from popstack.datamodules.config import DataConfig
    from popstack.datamodules.typed import setting
    from popstack.pipeline import schema

    cfg = OmegaConf.create({"data": {"kind": "smpd", "brand_new": 3}})
    with pytest.raises(schema.ConfigError, match="data.brand_new"):
        schema._check(cfg, {"data": schema.Typed(DataConfig)}, "")
    grown = make_dataclass("Grown", [("brand_new", int, setting(0, lo=0))], bases=(DataConfig,))  # one field
    schema._check(cfg, {"data": schema.Typed(grown)}, "")
    with pytest.raises(schema.ConfigError, match="data.brand_new=-1"):
        schema._check(OmegaConf.create({"data": {"brand_new": -1}}), {"data": schema.Typed(grown)}, "")


def _differs_from_defaults(values: dict, cls: type, where: str) -> list[str]:
    """Keys of a group's YAML ``values`` that repeat the dataclass ``cls``'s default (nested dataclasses walked)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    same = []
    for key, value in values.items():
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            same += _differs_from_defaults(value, type(default), f"{where}.{key}")
        elif value == default and value != "???":  # ??? says "must be set" where a file needs it said
            same.append(f"{where}.{key}")
    return same


def test_each_typed_group_writes_its_defaults_once():
    """Every group with a typed config: the schema checks it from the dataclass, each of its YAML files starts from
    the dataclass (``defaults: [schema, _self_]``) and sets only values that differ from the dataclass's defaults."""
    from omegaconf import OmegaConf

    from popstack.pipeline.config import CONFIG_DIR, group_schemas
    from popstack.pipeline.schema import SCHEMA, Typed

    groups = group_schemas()
    assert {"features", "backbone", "logger", "paths"} <= set(groups)
    for group, cls in groups.items():
        assert SCHEMA[group] == Typed(cls), group
        files = sorted((CONFIG_DIR / group).glob("*.yaml"))
        assert files, group
        for path in files:
            values = OmegaConf.to_container(OmegaConf.load(path))
            assert values.pop("defaults") == ["schema", "_self_"], path
            assert _differs_from_defaults(values, cls, f"{group}/{path.stem}") == [], path


def test_typed_group_defaults_are_what_composes():
    """The composed default of a typed group is the dataclass (nothing added on the way), e.g. the backbone."""
    import dataclasses

    from popstack.lightning_modules.backbone_config import BackboneConfig
    from popstack.pipeline.config import compose_config
    from popstack.pipeline.settings import LoggerConfig

    cfg = compose_config(["~experiment", "backbone=tiny", "logger=wandb_offline"])
    assert dict(cfg.backbone) == dataclasses.asdict(BackboneConfig())
    assert _plain(cfg.logger) == dataclasses.asdict(LoggerConfig())
    assert compose_config(["~experiment", "backbone=vit_l14"]).backbone.embed_batch_size == 128


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
