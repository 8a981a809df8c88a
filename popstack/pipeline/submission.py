"""The official SMP submission file (no plotting dependencies: ``predict.py`` and the report both write it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from popstack.datamodules.atomic import atomic_write_text
from popstack.datamodules.schema import submission_post_id

SUBMISSION_VERSION = "VERSION 1.2"


def write_submission(post_ids: list[str], scores: np.ndarray, path: Path, details: str) -> Path:
    """The official SMP submission JSON: one row per post of ``post_ids``, in that order; scores are log-views."""
    if len(post_ids) != len(scores):
        raise ValueError(f"{len(post_ids)} post ids but {len(scores)} scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("non-finite popularity scores in the submission")
    payload = {
        "version": SUBMISSION_VERSION,
        "result": [
            {"post_id": submission_post_id(pid), "popularity_score": round(float(s), 4)}
            for pid, s in zip(post_ids, scores)
        ],
        "external_data": {"used": "false", "details": details},
    }
    return atomic_write_text(path, json.dumps(payload, indent=1))
