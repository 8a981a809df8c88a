"""AutoGluon-Tabular on the flat table written by ``benchmarks/quality.py``; runs in AutoGluon's own environment.

    /path/to/autogluon-venv/bin/python benchmarks/autogluon_runner.py WORKDIR [--preset medium_quality]

Reads ``WORKDIR/train.parquet`` (features + ``label``) and ``WORKDIR/test.parquet`` (features), writes
``WORKDIR/autogluon_predictions.parquet`` (one ``prediction`` per test row, in order). It imports nothing from
popstack: AutoGluon pins pandas < 2.4 while popstack uses pandas 3, so the two cannot share one environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--preset", default="medium_quality")
    a = p.parse_args(argv)
    import pandas as pd
    from autogluon.tabular import TabularPredictor

    train = pd.read_parquet(a.workdir / "train.parquet")
    test = pd.read_parquet(a.workdir / "test.parquet")
    predictor = TabularPredictor(label="label", problem_type="regression", path=str(a.workdir / "autogluon"),
                                 verbosity=0)
    predictor.fit(train, presets=a.preset)
    out = pd.DataFrame({"prediction": predictor.predict(test).to_numpy(dtype="float64")})
    out.to_parquet(a.workdir / "autogluon_predictions.parquet", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
