"""popstack training pipeline: prepare -> features -> neural -> extract -> stack -> report, in one run directory.

    python train.py                                   # the demo: synthetic SMPD data + tiny CLIP, offline
    python train.py experiment=smpd data.root=DIR hydra.run.dir=OUT
    python train.py hydra.run.dir=OUT                 # rerun: finished stages are skipped, training resumes
    python train.py stages=[prepare,features]         # a subset of the stages

``train(cfg)`` is importable (tests call it with a composed config); ``main()`` is the command line.
"""

from __future__ import annotations

import logging
import os
import warnings
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads (torch, LightGBM) sleep instead of spinning: on a shared or oversubscribed CPU a spinning
# thread steals the core its partner needs (2 torch threads on a loaded 2-core machine: 1.6 s -> 0.2 s CPU per step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger("popstack")


def train(cfg: DictConfig) -> dict:
    """Run the configured stages into ``cfg.run_dir``; returns the final metrics (per member, per stage)."""
    from pipeline.stages import Pipeline

    return Pipeline(cfg).run()


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import compose_config
    from pipeline.errors import user_error_types

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|GPU available).*")
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose_config(argv)
        train(cfg)
    except user_error_types() as err:
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with hydra.run.dir=<run dir> to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
