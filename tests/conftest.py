"""Shared fixtures: offline environment, and a composed config shrunk to a seconds-long CPU run in tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_fast(tmp_path, *overrides: str):
    """The train config with the `debug=fast` overlay, writing everything under ``tmp_path``."""
    from pipeline.config import compose_config

    return compose_config(
        [
            "debug=fast",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
            *overrides,
        ]
    )


@pytest.fixture
def fast_cfg(tmp_path):
    return compose_fast(tmp_path)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
