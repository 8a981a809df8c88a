"""Checkpoint-based inference on new posts: one prediction per post id.

    python predict.py RUN_DIR RAW_DIR --out predictions.json [--accelerator cpu] [--devices 1] [--precision 32-true]
                      [--shared-dir DIR]

RUN_DIR is a finished ``train.py`` run (its ``config.yaml``, feature state, checkpoints and stacker are all that is
read); RAW_DIR holds the new posts in the form of the run's data source (``datamodules.sources``): for ``data=smpd``
and ``data=synthetic`` a directory in the SMPD layout (either or both splits; labels are not needed and are
ignored), for ``data=table`` a CSV or Parquet file with the run's column mapping.
The output format follows the extension: ``.json`` (the SMP submission format, in file order), ``.parquet`` or
``.csv`` (``post_id, split, popularity_score``); ``<out>.meta.json`` records the run, the number of posts and of
images that could not be read (all of them missing is also warned about loudly).
From Python, without files: ``pipeline.inference.Predictor``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("popstack")
OUTPUT_FORMATS = (".json", ".parquet", ".csv")
META_SUFFIX = ".meta.json"


def check_out(out: Path) -> Path:
    """Refuse a bad ``--out`` before any work: known extension, parent an existing writable directory, not a
    directory."""
    from popstack.pipeline.errors import UserError

    if out.suffix not in OUTPUT_FORMATS:
        raise UserError(f"--out must end with one of {', '.join(OUTPUT_FORMATS)}: {out}")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'predictions.json'}")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: the folder {parent} does not exist (or is not a directory)")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write to {parent}")
    from popstack.pipeline.checks import probe_writable

    probe_writable(out.resolve())  # a real create: os.access says yes for root on /proc
    return out


def write_predictions(result, out: Path, run_name: str) -> None:
    """``result`` (``post_id, split, popularity_score``) in the format of ``out``'s extension, and its metadata
    (``result.attrs["popstack"]``: posts, images that could not be read) next to it as ``<out>.meta.json``."""
    from popstack.datamodules.atomic import atomic_path, atomic_write_json
    from popstack.datamodules.schema import KEY
    from popstack.pipeline.submission import write_submission

    if out.suffix == ".json":
        write_submission(result[KEY].tolist(), result.popularity_score.to_numpy(), out,
                         details=f"popstack predict.py with run {run_name}")
    else:
        with atomic_path(out) as tmp:
            result.to_parquet(tmp, index=False) if out.suffix == ".parquet" else result.to_csv(tmp, index=False)
    atomic_write_json(out.with_name(out.name + META_SUFFIX), result.attrs.get("popstack", {}))


def predict(run_dir: Path, raw_dir: Path, out: Path, devices: int | None = None, work_dir: Path | None = None,
            progress_bar: bool = True, accelerator: str | None = None, precision: str | None = None):
    """Predictions for every post of ``raw_dir``, written to ``out``; returns the DataFrame (None on ranks above 0).

    ``work_dir``: where the temporary folder shared by every rank goes (default: ``out``'s folder, which every
    node of a multi-node launch sees when ``out`` is on shared storage; never node-local ``/tmp``).
    ``accelerator``/``devices``/``precision``: see ``Predictor.from_run_dir`` (default: the run's trainer, on the
    CPU where the run asks for a GPU and this machine has none).
    """
    from popstack.pipeline.inference import Predictor

    check_out(out)
    predictor = Predictor.from_run_dir(run_dir, devices=devices, progress_bar=progress_bar, accelerator=accelerator,
                                       precision=precision)
    result = predictor.predict(raw_dir, work_dir=work_dir if work_dir is not None else out.resolve().parent)
    if result is not None:  # ranks above 0 of --devices N only took their share of the neural predictions
        write_predictions(result, out, run_dir.name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished train.py run directory")
    parser.add_argument("raw_dir", type=Path, help="new posts in the form of the run's data source (an SMPD-layout "
                        "directory; for data=table a CSV or Parquet file)")
    parser.add_argument("--out", type=Path, required=True, help="output file (.json, .parquet or .csv)")
    parser.add_argument("--accelerator", default=None,
                        help="cpu, gpu or auto for the neural models (default: the run's; a GPU run falls back to the "
                             "CPU with a warning where this machine has no CUDA)")
    parser.add_argument("--devices", type=int, default=None, help="devices for the neural models (default: the run's)")
    parser.add_argument("--precision", default=None,
                        help="e.g. 32-true or bf16-mixed (default: the run's; 32-true after a CPU fallback)")
    parser.add_argument("--shared-dir", type=Path, default=None,
                        help="folder for the temporary files every rank shares; on several nodes it must be on "
                             "storage all nodes see (default: the folder of --out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|GPU available).*")
    from popstack.pipeline.checks import disk_full
    from popstack.pipeline.errors import user_error_types
    from popstack.pipeline.training import quiet_lightning

    if args.devices is not None and args.devices < 1:
        print(f"error: --devices {args.devices}: give 1 or more (or leave it out for the run's own)", file=sys.stderr)
        return 2

    quiet_lightning()
    try:
        result = predict(args.run_dir.resolve(), args.raw_dir.resolve(), args.out, devices=args.devices,
                         work_dir=args.shared_dir, progress_bar=not args.no_progress, accelerator=args.accelerator,
                         precision=args.precision)
    except user_error_types() as err:
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:
        if not disk_full(err):
            raise
        print(f"error: disk full while writing ({' '.join(str(err).split())[:200]}); free space and rerun",
              file=sys.stderr)
        return 2
    if result is not None:
        print(f"wrote {len(result)} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
