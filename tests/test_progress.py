"""Progress: per batch inside the sentence family; plain periodic log lines instead of bars when stderr is not a
terminal (a captured log), bars on a terminal."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
    import sys

    from popstack.datamodules.progress import progress_mode

    monkeypatch.delenv("POPSTACK_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_mode() == "log" and progress_mode(enabled=False) == "off"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_mode() == "bar"
    monkeypatch.setenv("POPSTACK_PROGRESS", "log")
    assert progress_mode() == "log"


def test_a_captured_log_gets_lines_not_bar_redraws(monkeypatch, caplog, capsys):
    from popstack.datamodules import progress as mod

    monkeypatch.setenv("POPSTACK_PROGRESS", "log")
    monkeypatch.setattr(mod, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="popstack"):
        assert list(mod.progress(range(3), desc="work", unit="batch")) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"work: {i}/3 batch ({100 * i / 3:.0f}%) in 0 s" for i in (1, 2, 3)]
    assert "\r" not in capsys.readouterr().err  # no bar was drawn
    caplog.clear()
    monkeypatch.setattr(mod, "LOG_EVERY_S", 3600.0)
    with caplog.at_level(logging.INFO, logger="popstack"):
        list(mod.progress(range(50), desc="quick"))
    assert not caplog.records  # short work: no line at all


def test_sentence_encoding_reports_per_batch(monkeypatch, caplog):
    from popstack.datamodules import progress as mod
    from popstack.features.sentence import SentenceEncoder, resolve_model_dir

    try:
        encoder = SentenceEncoder(resolve_model_dir("minilm"), max_length=16, batch_size=2)
    except (ImportError, OSError) as err:
        pytest.skip(f"shipped MiniLM not available: {err}")
    monkeypatch.setenv("POPSTACK_PROGRESS", "log")
    monkeypatch.setattr(mod, "LOG_EVERY_S", 0.0)
    encoder.progress = True
    with caplog.at_level(logging.INFO, logger="popstack"):
        vectors = encoder.encode([f"text number {i}" for i in range(7)])
    assert vectors.shape[0] == 7
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sentence encoder")]
    assert [ln.split(": ")[1].split(" ")[0] for ln in lines[:4]] == ["1/4", "2/4", "3/4", "4/4"]


def test_training_logs_one_line_per_epoch_without_a_terminal(tmp_path, monkeypatch, caplog):
    from popstack.pipeline.training import fit_resumable
    from tests.helpers import compose_fast
    from tests.test_ecosystem import TinyData, TinyRegressor

    monkeypatch.setenv("POPSTACK_PROGRESS", "log")
    cfg = compose_fast(tmp_path)
    with caplog.at_level(logging.INFO, logger="popstack"):
        fit_resumable(TinyRegressor(), TinyData(), tmp_path / "m" / "fold0", max_epochs=2, monitor="val/loss",
                      trainer_cfg=OmegaConf.to_container(cfg.trainer), mode="min", seed=0, progress_bar=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("m/fold0: epoch")]
    assert [ln.split(",")[0] for ln in lines] == ["m/fold0: epoch 1/2 done", "m/fold0: epoch 2/2 done"]
