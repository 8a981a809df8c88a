"""popstack training pipeline: prepare -> features -> neural -> extract -> stack -> report, in one run directory.

    python train.py                                   # the demo: synthetic SMPD data + tiny CLIP, offline
    python train.py experiment=smpd data.root=DIR hydra.run.dir=OUT
    python train.py hydra.run.dir=OUT                 # rerun: finished stages are skipped, training resumes
    python train.py stages=[prepare,features]         # a subset of the stages
    python train.py trainer.gradient_clip_val=1       # any lightning.Trainer argument, no "+" needed
    python train.py -m model.co_attention.lr=1e-3,3e-4   # multirun: one run dir per job + comparison.csv/md
    python train.py --cfg job [overrides]             # print the composed, validated config and exit

Every config value is checked (pipeline/schema.py) before anything runs: a bad one ends in one "error:" line, exit 2.

``train(cfg)`` is importable (tests call it with a composed config); ``main()`` is the command line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads (torch, LightGBM) sleep instead of spinning: on a shared or oversubscribed CPU a spinning
# thread steals the core its partner needs (2 torch threads on a loaded 2-core machine: 1.6 s -> 0.2 s CPU per step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger("popstack")


def train(cfg: DictConfig) -> dict:
    """Run the configured stages into ``cfg.run_dir``; returns the final metrics (per member, per stage)."""
    from pipeline.driver import Pipeline

    return Pipeline(cfg).run()


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    from pipeline.config import compose_config
    from pipeline.errors import UserError, user_error_types

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|GPU available).*")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        multirun, show, overrides = _flags(argv)
        if show:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(compose_config(overrides)), end="")
        elif multirun:
            from pipeline.sweep import run_sweep

            root, table = run_sweep(overrides, compose_config, train)
            print(f"multirun: {len(table)} jobs in {root} (comparison.csv, comparison.md)")
            return 0 if (table.status == "ok").all() else 1
        else:
            train(compose_config(overrides))
    except (UserError, HydraException) as err:  # config errors: caught before user_error_types() imports the rooms
        return _error(err)
    except user_error_types() as err:
        return _error(err)
    except (OSError, RuntimeError) as err:
        from pipeline.checks import disk_full

        if not disk_full(err):
            raise
        return _error(f"disk full while writing ({err}); free space and rerun the same command to resume")
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with hydra.run.dir=<run dir> to resume", file=sys.stderr)
        return 130
    return 0


def _error(err: BaseException | str) -> int:
    """One ``error:`` line on stderr; exit status 2."""
    print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
    return 2


def _flags(argv: list[str]) -> tuple[bool, bool, list[str]]:
    """(multirun, print config, overrides) from the command line: ``-m/--multirun``, ``--cfg job`` / ``-c job``."""
    from pipeline.errors import UserError

    multirun, show, rest = False, False, []
    it = iter(argv)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            what = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if what != "job":
                raise UserError(f"--cfg {what}: only --cfg job is supported (the composed, validated config)")
            show = True
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg}; options are -m/--multirun, --cfg job, -h (the rest are key=value)")
        else:
            rest.append(arg)
    return multirun, show, rest


if __name__ == "__main__":
    sys.exit(main())
