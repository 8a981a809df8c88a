"""popstack training pipeline: prepare -> features -> neural -> extract -> stack -> report, in one run directory.

    python train.py                                   # the demo: synthetic SMPD data + tiny CLIP, offline
    python train.py experiment=smpd data.root=DIR hydra.run.dir=OUT
    python train.py hydra.run.dir=OUT                 # rerun: finished stages are skipped, training resumes
    python train.py stages=[prepare,features]         # a subset of the stages
    python train.py trainer.gradient_clip_val=1       # any lightning.Trainer argument, no "+" needed
    python train.py +callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging
                    +callbacks.swa.swa_lrs=0.001      # an extra Lightning callback (the callbacks group)
    python train.py -m model.co_attention.lr=1e-3,3e-4   # multirun: one run dir per job + comparison.csv/md
    python train.py -m hydra/launcher=submitit_slurm ... # any Hydra launcher or sweeper plugin (README)
    python train.py --cfg job [overrides]             # print the composed, validated config and exit (no GPU needed)
    python train.py --cfg hydra | --info              # Hydra's own config / information

The command line is Hydra's (``@hydra.main``): the run directory gets ``.hydra/`` (config, overrides) and
``train.log``. Every job's config is checked (popstack/pipeline/schema.py) before Hydra starts: a bad value, or a
mandatory one left unset (``???``), ends in one "error:" line, exit 2, with nothing written.

``popstack.train(cfg)`` is the same run from Python; ``main()`` is the command line (``popstack-train``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from omegaconf import DictConfig

from popstack import train

log = logging.getLogger("popstack")


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from popstack.pipeline.errors import UserError, user_error_types

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        mode, overrides, hydra_args = _flags(argv)
        if mode != "hydra":  # --info / --cfg hydra: Hydra logs what it prints; a second handler would repeat it
            _logging()
        if mode == "job":
            from omegaconf import OmegaConf

            from popstack.pipeline.config import compose_config

            print(OmegaConf.to_yaml(compose_config(overrides, hardware=False)), end="")
            return 0
        if mode in ("run", "multirun"):
            _check_jobs(overrides, multirun=mode == "multirun")  # schema check first: nothing written on a bad value
    except (UserError, HydraException) as err:  # config errors: caught before user_error_types() imports the rooms
        return _error(err)
    except OmegaConfBaseException as err:
        return _error(_omegaconf_message(err))
    except user_error_types() as err:
        return _error(err)
    try:
        return _run_hydra(hydra_args, multirun=mode == "multirun")
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with hydra.run.dir=<run dir> to resume", file=sys.stderr)
        return 130


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|GPU available).*")


def _error(err: BaseException | str) -> int:
    """One ``error:`` line on stderr (an error with a cause, e.g. a value of the wrong type in an override: both
    first lines); exit status 2."""
    text = err if isinstance(err, str) else (' '.join(str(err).split()) or type(err).__name__)
    cause = None if isinstance(err, str) else err.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text}: {str(cause).strip().splitlines()[0]}"
    print(f"error: {text}", file=sys.stderr)
    return 2


def _omegaconf_message(err) -> str:
    """A config error of OmegaConf in one line: a mandatory value left unset names its key and how to set it."""
    from omegaconf.errors import MissingMandatoryValue

    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, MissingMandatoryValue):
        return f"{key} must be set (it is ??? in the composed config): add {key}=<value> to the command line"
    return f"{key}: {str(err).splitlines()[0]}"


def _flags(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(mode, overrides, the arguments for Hydra) from the command line. mode: ``run``, ``multirun`` (``-m``),
    ``job`` (``--cfg job``: printed here, composed and validated without needing the GPU it names) or ``hydra``
    (the rest of Hydra's flags: ``--cfg hydra|all``, ``--info``, ``--resolve``, ``--package``: Hydra answers)."""
    from popstack.pipeline.config import trainer_overrides

    mode, overrides, flags = "run", [], []
    it = iter(argv)
    for arg in it:
        if arg in ("-m", "--multirun"):
            mode = "multirun" if mode == "run" else mode
            flags.append(arg)
        elif arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            what = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            mode = "job" if what == "job" else "hydra"
            flags += ["--cfg", what]
        elif arg in ("-p", "--package"):
            flags += [arg, next(it, "")]
        elif arg.startswith("-"):  # --info [topic], --resolve, --hydra-help, ... : Hydra's own
            mode = "hydra" if mode in ("run", "multirun") and arg != "--resolve" else mode
            flags.append(arg)
        else:
            overrides.append(arg)
    overrides = trainer_overrides(overrides)
    # ``run_dir=X`` is also where Hydra writes .hydra/ and train.log
    hydra_dir = [f"hydra.run.dir={o.split('=', 1)[1]}" for o in overrides
                 if o.startswith("run_dir=") and o.split("=", 1)[1] not in ("", "null")
                 and not any(x.startswith("hydra.run.dir=") for x in overrides)]
    return mode, overrides, [*flags, *overrides, *hydra_dir, *_rank_overrides(overrides)]


def _rank_overrides(overrides: list[str]) -> list[str]:
    """Processes above rank 0 (torchrun, srun) write no ``.hydra/`` of their own and log to ``train_rank<k>.log``
    (rank 0 writes ``.hydra/`` and ``train.log``); Lightning's own launcher already passes its equivalents."""
    from popstack.pipeline.distributed import topology

    topo = topology()
    if topo.is_zero or any(o.startswith(("hydra.output_subdir=", "hydra.job.name=")) for o in overrides):
        return []
    return ["hydra.output_subdir=null", f"hydra.job.name=train_rank{topo.rank}"]


def _check_jobs(overrides: list[str], multirun: bool) -> None:
    """Compose and validate the run (or every job of a basic sweep) before Hydra writes anything. A sweep whose
    sweeper defines the search space itself (``hydra/sweeper=...``) is checked job by job as it runs."""
    from popstack.pipeline.config import compose_config

    if not multirun:
        cfg = compose_config(overrides)
        _check_writable(cfg.run_dir)  # Hydra writes .hydra/ there before the task runs
        _check_plan(cfg)
        return
    if any(o.lstrip("+~").startswith(("hydra/sweeper", "hydra.sweeper")) for o in overrides):
        return
    from popstack.pipeline.sweep import expand

    for job in expand(overrides)[0]:
        compose_config(job)


def _check_plan(cfg: DictConfig) -> None:
    """The checks of ``pipeline.checks`` that need no data read (the stage plan against the run directory, the data
    root's shape), before Hydra creates the run directory; the driver repeats them for ``train(cfg)`` callers."""
    from pathlib import Path

    from popstack.pipeline.checks import check_data_root, check_plan
    from popstack.pipeline.distributed import topology
    from popstack.pipeline.layout import RunLayout

    if topology().is_zero:
        check_plan(cfg, RunLayout(Path(str(cfg.run_dir))))
        if "prepare" in cfg.stages:
            check_data_root(cfg)


def _check_writable(run_dir: str) -> None:
    """Refuse a run directory that cannot be created or written (a file in its path, no permission), without
    creating anything."""
    from pathlib import Path

    from popstack.pipeline.errors import UserError

    path = Path(run_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to run directory {run_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to run directory {run_dir}: no write permission on {existing}")


#: Exit status of the last Hydra job run in this process (2: a user error, reported in one line).
_STATUS: list[int] = []


def _task(cfg: DictConfig):
    """The ``@hydra.main`` task: one pipeline run in the job's output directory; returns the blend's
    out-of-fold SRC (what a sweeper such as Optuna maximises), None when the report did not run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from popstack.pipeline.config import finish_config
    from popstack.pipeline.errors import UserError, user_error_types
    from popstack.pipeline.sweep import record_job

    _logging()  # Hydra configured logging for the job (console + <run dir>/train.log); keep our levels
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        cfg = finish_config(cfg, hc.runtime.output_dir)
        metrics = train(cfg)
    except (UserError, *user_error_types(), OSError, RuntimeError) as err:
        from popstack.pipeline.checks import disk_full

        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, user_error_types()) and not disk_full(err):
            raise
        _STATUS.append(2)
        text = " ".join(str(err).split()) or type(err).__name__
        if disk_full(err):
            text = f"disk full while writing ({text}); free space and rerun the same command to resume"
        if multirun:  # the sweep goes on; comparison.csv records the failure
            log.error("multirun: job %s failed: %s", hc.job.num, text)
            record_job(hc.runtime.output_dir, list(hc.overrides.task), f"failed: {text}", {})
            return None
        print(f"error: {text}", file=sys.stderr)
        return None
    _STATUS.append(0)
    if multirun:
        record_job(cfg.run_dir, list(hc.overrides.task), "ok", metrics)
    return (metrics.get("report") or {}).get("src")


def _run_hydra(args: list[str], multirun: bool) -> int:
    """Run ``_task`` under ``@hydra.main`` with ``args`` as the command line; the exit status."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from popstack.pipeline.config import CONFIG_DIR, register_schemas

    register_schemas()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "train.py", *args]
    _STATUS.clear()
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")(_task)()
    except SystemExit as exit_:  # Hydra's own exits (--info, a failed job: traceback printed by Hydra)
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return max(_STATUS, default=0) and (1 if multirun else 2)


if __name__ == "__main__":
    sys.exit(main())
