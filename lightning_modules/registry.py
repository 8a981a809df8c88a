"""The neural modules as registered data: each module file registers one ``ModuleSpec``, and the pipeline reads
only the specs (it names no module).

A spec says what the pipeline needs to know before and after building the module: its class, its typed config
(one dataclass per module: hyperparameters + the training keys of ``ModuleConfig``, each default written once, in
the dataclass), the metric it monitors, the embedding-cache arrays it reads and whether it reads the tabular table
or CLIP's patch tokens, the outputs of its ``predict_step`` (prediction columns, F blocks), whether it trains per
fold and/or one F model on every post, and ``build(config, context)``: the module made from its config and the
run's data facts (``BuildContext``).

Discovery: ``module_specs()`` imports every file of this package once (``pkgutil``), so a new module is one file
that calls ``register_module`` at import, plus its entry in ``configs/model/default.yaml`` (the Hydra group
``model`` is the dataclass ``model_config_class()`` made from the registry). Registration order is file-name
order, then order within a file; the pipeline trains and writes prediction columns in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from popstack.datamodules.cached import EMBEDDING_FIELDS
from popstack.datamodules.typed import setting

#: Where a module's batches come from: the frozen-CLIP embedding cache, or raw images read from the shards.
INPUTS = ("embeddings", "images")


@dataclass
class ModuleConfig:
    """The training keys every neural module has (a module's config dataclass extends it and may re-declare a
    field to give it another default).

    enabled: train it. input: ``embeddings`` (the frozen-CLIP cache, fast) or ``images`` (raw images from the
    shards, through the module's own CLIP copy; also implied by ``backbone.trainable_last_blocks > 0``).
    epochs, batch_size (the global batch: each of devices x nodes processes loads batch_size / world size),
    lr, weight_decay (AdamW), scheduler (``cosine`` over all steps, or ``constant``), huber_delta (the Huber loss
    of the popularity head), early_stopping_patience (validations without improvement of the monitored metric
    before stopping; null = off).
    """

    enabled: bool = setting(True)
    input: str = setting("embeddings", choices=INPUTS)
    epochs: int = setting(10, lo=1)
    batch_size: int = setting(128, lo=1)
    lr: float = setting(1e-3, lo=0, lo_open=True)
    weight_decay: float = setting(1e-4, lo=0)
    scheduler: str = setting("cosine", choices=("cosine", "constant"))
    huber_delta: float = setting(1.0, lo=0, lo_open=True)
    early_stopping_patience: int | None = setting(None, lo=1)


#: The keys of ``ModuleConfig``: the training loop's, not the module's hyperparameters.
TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(ModuleConfig) if f.name not in ("lr", "weight_decay",
                                                                                        "scheduler", "huber_delta"))


def hyperparameters(config: Any, *, leave_out: tuple[str, ...] = ()) -> dict:
    """The module's constructor arguments that come from its config: every field but the training loop's
    (``TRAINING_KEYS``) and ``leave_out`` (keys the pipeline or ``build`` reads itself)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in TRAINING_KEYS and f.name not in leave_out}


@dataclass(frozen=True)
class BuildContext:
    """The run's data facts a module is built from (``pipeline.neural.build_module`` fills them; the contract
    tests fill them from tiny random data).

    backbone_name, trainable_last_blocks, token_len, image_token_grid: the ``backbone`` group's values (the patch
    grid is 0 when no enabled module reads patch tokens). raw_batches: the module trains over the shards (raw
    image + tokens) and needs its own CLIP copy. embed_dim: CLIP's embedding width (the cache's). tabular_dim:
    width of the standardised tabular vector the datamodule serves (0 = none). class_names: the subcategory
    vocabulary. target_mean, target_std: training-label statistics (heads predict the standardised label).
    seed: the run's seed. cache: the embedding-cache arrays (``datamodules.cached.load_embedding_cache``),
    train_idx: the training rows of the cache, subcategory_id: every post's class id, posts(columns): those
    columns of the run's posts table, every post in cache order.
    """

    backbone_name: str
    trainable_last_blocks: int
    token_len: int
    image_token_grid: int
    raw_batches: bool
    embed_dim: int
    tabular_dim: int
    class_names: tuple[str, ...]
    target_mean: float
    target_std: float
    seed: int
    cache: Mapping[str, Any]
    train_idx: Any
    subcategory_id: Any
    posts: Callable[[list[str]], Any]

    def raw_batch_args(self) -> dict:
        """Constructor arguments of a module that reads cached batches by default and raw batches only when
        ``raw_batches``: its own CLIP copy (weights loaded by the pipeline afterwards) or none."""
        if not self.raw_batches:
            return {"backbone_name": None, "backbone_pretrained": None, "trainable_last_blocks": 0}
        return {"backbone_name": self.backbone_name, "backbone_pretrained": None,
                "trainable_last_blocks": self.trainable_last_blocks}


def _never(config: Any) -> bool:
    return False


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class ModuleSpec:
    """One registered neural module.

    name: its key under ``model`` (and its folder under ``neural/``). module: the LightningModule class (its
    ``load_from_checkpoint`` loads a fold). config: its config dataclass (extends ``ModuleConfig``).
    build(config, context): the module for one fit. monitor, mode: the validation metric its fold models keep the
    best checkpoint (and early-stop) on. cache_fields: the embedding-cache arrays its batches read.
    reads_tabular(config): whether its batches carry the standardised tabular vector. patch_tokens: whether it
    reads CLIP's patch tokens (the cache then holds them: ``backbone.image_token_grid``).
    outputs(config): the names its ``predict_step`` returns besides ``post_id`` (a vector output ``v`` becomes
    columns ``v_000``...); ``prediction`` is its popularity prediction (a ``pred_<name>`` column of the stack).
    f_blocks: {F block it emits: feature family} (blocks of the F vector, eq. 11). fold_models(config): whether it
    trains once per fold (out-of-fold predictions). f_model: None, or the config changes of its one F model
    trained on every post with a known class (no label, no fold), the source of every post's F blocks.
    """

    name: str
    module: type
    config: type
    build: Callable[[Any, BuildContext], Any]
    monitor: str
    mode: str = "min"
    cache_fields: tuple[str, ...] = EMBEDDING_FIELDS
    reads_tabular: Callable[[Any], bool] = _never
    patch_tokens: bool = False
    outputs: Callable[[Any], tuple[str, ...]] = lambda config: ("prediction",)
    f_blocks: Mapping[str, str] = field(default_factory=dict)
    fold_models: Callable[[Any], bool] = _always
    f_model: Mapping[str, Any] | None = None

    @property
    def needs_images(self) -> str:
        """Why the module is pointless without a readable image ("" when it still learns from the text side)."""
        return self.module.needs_images

    @property
    def min_classes(self) -> int:
        """The fewest subcategories its classification needs (0: it classifies nothing)."""
        return self.module.min_classes

    @property
    def image_f_blocks(self) -> tuple[str, ...]:
        """Its F blocks that are functions of the image alone (left out without images)."""
        return tuple(self.module.image_f_blocks)

    def config_of(self, values: Mapping[str, Any] | None = None, **changes) -> Any:
        """The typed config from plain values (a composed ``model.<name>`` section as a dict), with ``changes``."""
        return dataclasses.replace(self.config(**dict(values or {})), **changes)


_REGISTRY: dict[str, ModuleSpec] = {}


def register_module(spec: ModuleSpec) -> ModuleSpec:
    """Add ``spec`` to the registry (called at import by the module's file); a name registers once."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"neural module {spec.name!r} is registered twice "
                         f"({_REGISTRY[spec.name].module.__module__} and {spec.module.__module__})")
    if spec.name == "extract":
        raise ValueError("'extract' is the model group's extract section, not a module name")
    if not (dataclasses.is_dataclass(spec.config) and issubclass(spec.config, ModuleConfig)):
        raise TypeError(f"{spec.name}: config must be a dataclass extending ModuleConfig")
    _REGISTRY[spec.name] = spec
    return spec


@functools.cache
def _discover() -> None:
    """Import every file of ``popstack.lightning_modules`` (each module file registers itself)."""
    import popstack.lightning_modules as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")


def module_specs() -> dict[str, ModuleSpec]:
    """{name: spec} of every registered module, in registration order."""
    _discover()
    return dict(_REGISTRY)


def module_spec(name: str) -> ModuleSpec:
    specs = module_specs()
    if name not in specs:
        raise KeyError(f"unknown neural module {name!r}; modules are {list(specs)}")
    return specs[name]


@dataclass
class ExtractConfig:
    """The extract stage: ``pca_dim`` is the PCA width of each wide block of the F vector (eq. 11); 0 keeps the
    raw columns (both paper experiments use 0)."""

    pca_dim: int = setting(32, lo=0)


@functools.cache
def model_config_class() -> type:
    """The typed config of the Hydra group ``model``: one field per registered module (its config dataclass), plus
    ``extract``. Made from the registry, so a new module extends it without an edit here."""
    fields = [(name, spec.config, field(default_factory=spec.config)) for name, spec in module_specs().items()]
    fields.append(("extract", ExtractConfig, field(default_factory=ExtractConfig)))
    cls = dataclasses.make_dataclass("ModelConfig", fields)
    cls.__module__ = __name__
    return cls
