"""One Trainer factory: every ``lightning.Trainer`` of the pipeline comes from ``pipeline.training.make_trainer``, so a
``trainer.<key>`` of the config means the same for each fold's fit and each fold's prediction."""

from __future__ import annotations

import pytest


def test_make_trainer_passes_every_trainer_key_and_refuses_pipeline_owned_ones():
    from omegaconf import OmegaConf

    from popstack.pipeline.training import make_trainer, trainer_setting

    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed", "max_steps": 3})
    trainer = make_trainer(cfg, logger=False, enable_progress_bar=False)
    assert trainer.precision == "bf16-mixed" and trainer.max_steps == 3
    with pytest.raises(ValueError, match="logger"):
        make_trainer({"logger": False}, logger=False)
    # unset keys: the pipeline's default, else Lightning's own (read from its signature)
    assert trainer_setting({}, "num_sanity_val_steps") == 0
    assert trainer_setting({}, "num_nodes") == 1 and trainer_setting({}, "devices") == "auto"
    assert trainer_setting({"devices": 2}, "devices") == 2


def test_a_trainer_key_reaches_the_fit_and_the_prediction_trainers(tmp_path, monkeypatch):
    """``trainer.benchmark=true`` (and the cpu group's ``deterministic``) reach every fit and every prediction of
    the neural and extract stages."""
    import inspect

    import lightning

    from popstack import train
    from popstack.lightning_modules.extract import KeyedPredictionWriter
    from tests.helpers import compose_fast

    made: list[dict] = []

    class Spy(lightning.Trainer):
        __signature__ = inspect.signature(lightning.Trainer)  # what the schema and trainer_setting read

        def __init__(self, **kwargs):
            made.append(kwargs)
            super().__init__(**kwargs)

    cfg = compose_fast(tmp_path, "stages=[prepare,features,neural,extract]", "model.prompt_prototype.enabled=false",
                       "model.co_attention.enabled=false", "trainer.benchmark=true")
    monkeypatch.setattr(lightning, "Trainer", Spy)
    train(cfg)
    fits = [k for k in made if "max_epochs" in k]
    predictions = [k for k in made if any(isinstance(c, KeyedPredictionWriter) for c in k.get("callbacks", []))]
    assert len(fits) == cfg.n_folds and len(predictions) == cfg.n_folds  # hierarchical: one fit, one predict a fold
    for kwargs in fits + predictions:
        assert kwargs["benchmark"] is True and kwargs["deterministic"] is True
        assert kwargs["precision"] == cfg.trainer.precision and kwargs["strategy"] == cfg.trainer.strategy
