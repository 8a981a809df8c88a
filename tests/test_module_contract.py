"""The neural module contract, run over every registered module (``lightning_modules.registry``; no module is named
here, so a new module file is picked up without an edit): built by its spec from its default config on tiny random
data (the tiny backbone), it trains one step on the pipeline's cached batches, is saved, loaded back the way the
pipeline loads a fold, predicts the same outputs, and its prediction frame has exactly the columns its spec
declares. A module with an F model passes the same contract with its F model's config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from popstack.datamodules.cached import CachedPosts, keep_batch
from popstack.datamodules.schema import KEY
from popstack.lightning_modules.backbone import TINY_MODEL, load_backbone
from popstack.lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs
from popstack.lightning_modules.registry import BuildContext, ModuleConfig, module_specs
from tests.helpers import quiet_trainer

N, TRAIN, K, L_TOK, GRID, TAB = 24, 16, 3, 8, 2, 5
#: config changes that switch on outputs a module's default config leaves off (each one is another case)
VARIANTS = {"prompt_prototype": {"popularity_head": {"regression_weight": 1.0}}}
CASES = [(name, label, changes) for name, spec in module_specs().items()
         for label, changes in [("default", {}), *((("f_model", spec.f_model),) if spec.f_model else ()),
                                *VARIANTS.get(name, {}).items()]]


def case_id(case) -> str:
    return case[0] if case[1] == "default" else f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module")
def data():
    """A tiny embedding cache in the pipeline's layout (every field a module may read), its posts and labels."""
    rng = np.random.default_rng(0)
    d = load_backbone(TINY_MODEL).embed_dim
    cache = {
        "post_ids": [f"p{i}" for i in range(N)],
        "image_emb": rng.normal(size=(N, d)).astype(np.float16), "text_emb": rng.normal(size=(N, d)).astype(np.float16),
        "text_tokens": rng.normal(size=(N, L_TOK, d)).astype(np.float16),
        "text_mask": np.arange(L_TOK)[None, :] < rng.integers(1, L_TOK + 1, size=(N, 1)),
        "image_tokens": rng.normal(size=(N, GRID * GRID, d)).astype(np.float16),
        "has_image": np.ones(N, dtype=bool),
    }
    meta = pd.DataFrame({"subcategory_id": np.arange(N) % K, "category_id": np.zeros(N, dtype=int),
                         "label": rng.normal(6.0, 2.0, size=N)})
    posts = pd.DataFrame({"postdate": np.arange(N) * 3600, "concept": [f"c{i % 4}" for i in range(N)],
                          "uid": [f"u{i % 5}" for i in range(N)], "title": ["a photo"] * N,
                          "alltags": ["tag one"] * N})
    tabular = rng.normal(size=(N, TAB)).astype(np.float32)
    return {"cache": cache, "meta": meta, "posts": posts, "tabular": tabular, "embed_dim": d}


def loader(data, spec, config, rows, shuffle=False) -> DataLoader:
    """The pipeline's cached batches (``CachedPosts``) of ``rows`` with the fields the spec says it reads."""
    tabular = data["tabular"] if spec.reads_tabular(config) else None
    dataset = CachedPosts(data["cache"], data["meta"], rows, tabular, fields=spec.cache_fields)
    return DataLoader(dataset, batch_size=8, shuffle=shuffle, collate_fn=keep_batch)


def context(data, spec, config) -> BuildContext:
    y = data["meta"].label.to_numpy()[:TRAIN]
    return BuildContext(
        backbone_name=TINY_MODEL, trainable_last_blocks=0, token_len=L_TOK,
        image_token_grid=GRID if spec.patch_tokens else 0, raw_batches=False, embed_dim=data["embed_dim"],
        tabular_dim=TAB if spec.reads_tabular(config) else 0, class_names=tuple(f"class {k}" for k in range(K)),
        target_mean=float(y.mean()), target_std=float(y.std()), seed=0, cache=data["cache"],
        train_idx=np.arange(TRAIN), subcategory_id=data["meta"].subcategory_id.to_numpy(),
        posts=lambda columns: data["posts"][columns])


def predict_frame(module, batches: DataLoader, out) -> pd.DataFrame:
    writer = KeyedPredictionWriter(out)
    quiet_trainer(callbacks=[writer]).predict(module, batches, return_predictions=False)
    return merge_rank_outputs(out, [f"p{i}" for i in range(N)])


def declared(frame: pd.DataFrame, outputs: tuple[str, ...]) -> set[str]:
    """The outputs ``frame``'s columns come from: a scalar output is its own column, a vector ``v`` is ``v_000``..."""
    return {c if c in outputs else c.rsplit("_", 1)[0] for c in frame.columns if c != KEY}


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_module_trains_checkpoints_and_predicts_its_declared_columns(case, data, tmp_path):
    from popstack.pipeline.neural import load_module

    name, _, changes = case
    spec = module_specs()[name]
    config = spec.config_of(**changes)
    assert isinstance(config, ModuleConfig) and spec.mode in ("min", "max") and spec.monitor.startswith("val/")
    torch.manual_seed(0)
    module = spec.build(config, context(data, spec, config))
    assert isinstance(module, spec.module)
    trainer = quiet_trainer(fast_dev_run=1)
    trainer.fit(module, loader(data, spec, config, np.arange(TRAIN), shuffle=True),
                loader(data, spec, config, np.arange(TRAIN, N)))
    assert spec.monitor in trainer.callback_metrics, f"{name} does not log the metric it monitors ({spec.monitor})"
    path = tmp_path / "fold.ckpt"
    trainer.save_checkpoint(path)
    back = load_module(name, path).eval()
    module.eval()
    every = loader(data, spec, config, np.arange(N))
    frame = predict_frame(module, every, tmp_path / "trained")
    again = predict_frame(back, every, tmp_path / "loaded")
    pd.testing.assert_frame_equal(frame, again)
    outputs = tuple(spec.outputs(config))
    assert frame[KEY].tolist() == [f"p{i}" for i in range(N)]
    assert declared(frame, outputs) == set(outputs)
    if spec.fold_models(config):  # the pipeline reads each fold model's prediction
        assert "prediction" in outputs
    if "prediction" in outputs:
        assert np.isfinite(frame["prediction"].to_numpy()).all()
    blocks = {c.rsplit("_", 1)[0] for c in frame.columns if c != KEY} & set(spec.f_blocks)
    assert blocks == set(spec.f_blocks) & set(outputs)


@pytest.mark.parametrize("name", list(module_specs()))
def test_module_config_is_typed_and_complete(name):
    """Every config key has a rule (a ``setting`` field) and the constructor takes no default that a config key
    sets (defaults are the config's, written once)."""
    import inspect

    from popstack.datamodules.typed import RULE

    spec = module_specs()[name]
    fields = dataclasses.fields(spec.config)
    assert all(RULE in f.metadata for f in fields), [f.name for f in fields if RULE not in f.metadata]
    params = inspect.signature(spec.module.__init__).parameters
    with_default = [f.name for f in fields
                    if f.name in params and params[f.name].default is not inspect.Parameter.empty]
    assert not with_default, f"{name}: constructor defaults that could disagree with the config: {with_default}"


@pytest.mark.parametrize("name", list(module_specs()))
def test_every_module_is_a_section_of_the_model_group(name, tmp_path):
    """The model group's schema is made from the registry: each module's section composes with its defaults, and a
    value its config refuses ends in one ConfigError naming the key."""
    from popstack.pipeline.schema import ConfigError
    from tests.helpers import compose_fast

    spec = module_specs()[name]
    cfg = compose_fast(tmp_path)
    assert list(cfg.model[name]) == [f.name for f in dataclasses.fields(spec.config)]
    assert cfg.model[name].enabled == spec.config_of().enabled  # debug=fast leaves the switch to the default
    with pytest.raises(ConfigError, match=f"model.{name}.batch_size"):
        compose_fast(tmp_path, f"model.{name}.batch_size=0")


def test_a_disabled_module_changes_no_stage_hash(tmp_path):
    """The neural and extract stages hash the enabled modules' sections only (``model_identity``): switching a
    module off drops its section, so a module file added off leaves finished runs valid."""
    from omegaconf import OmegaConf

    from popstack.pipeline.stages import extract, neural
    from tests.helpers import compose_fast

    name = next(iter(module_specs()))
    on = OmegaConf.to_container(compose_fast(tmp_path), resolve=True)
    off = OmegaConf.to_container(compose_fast(tmp_path, f"model.{name}.enabled=false"), resolve=True)
    assert name in neural.config(on)["model"] and name not in neural.config(off)["model"]
    assert name not in extract.config(off)["model"] and "extract" in extract.config(off)["model"]
    changed = OmegaConf.to_container(compose_fast(tmp_path, f"model.{name}.enabled=false", f"model.{name}.epochs=3"),
                                     resolve=True)
    assert neural.config(changed) == neural.config(off)  # a disabled module's values are not part of the outputs
