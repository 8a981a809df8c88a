"""Stack fit time and peak RSS for growing row counts x 1k features; stack overhead vs its members' fits.

    python benchmarks/stacking_scale.py [--rows 20000,50000,100000] [--features 1000] [--members lightgbm,catboost]
        [--overrides "experiment=smpd"]

Members run with the shipped settings (``configs/stacking`` composed with ``--overrides``: learning_rate auto, early
stopping, threads auto); each member's seconds (fit + predict, all folds, last round) are printed. Synthetic
regression data (float32). The stack's total time is compared with the sum of its members' fit
times (reported by the stack itself): the overhead (fold bookkeeping, blending, pseudo-label selection) should
stay under 10%.
"""

from __future__ import annotations

import argparse

from common import measure, print_table, write_results


def fit(rows: int, n_features: int, members: tuple[str, ...], folds: int, overrides: list[str]) -> dict:
    import dataclasses
    import time

    import numpy as np
    import pandas as pd

    from popstack.datamodules.folds import assign_folds
    from popstack.pipeline.config import compose_config
    from popstack.pipeline.stages.stack import stack_config
    from popstack.stacking.stack import run_stack

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(rows, n_features)).astype(np.float32),
                     columns=[f"f{i}" for i in range(n_features)])
    y = 6 + X.iloc[:, :20].to_numpy() @ rng.normal(size=20) * 0.3 + rng.normal(0, 1, rows)
    y[int(rows * 0.8):] = np.nan
    shipped = stack_config(compose_config([*overrides, "run_dir=/tmp/popstack-stacking-scale"]), [])
    cfg = dataclasses.replace(shipped.only(list(members)), pseudo_rounds=1)
    start = time.perf_counter()
    res = run_stack(X, y, assign_folds(y, folds, 0), [], cfg)
    total = time.perf_counter() - start
    member_sum = float(res.rounds.member_seconds.sum())
    per_member = {f"{m}_s": float(res.scores.set_index("member").loc[m, "seconds"]) for m in members}
    return {"rows": rows, "features": n_features, **per_member, "member_fits_s": round(member_sum, 1),
            "stack_total_s": round(total, 1), "overhead_pct": round(100 * (total - member_sum) / member_sum, 1),
            "oof_src": round(float(res.scores.set_index("member").loc["blend", "src"]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="20000,50000,100000")
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--members", default="lightgbm,catboost")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--overrides", default="", help="train.py overrides whose stacking members are used")
    a = p.parse_args()
    members = tuple(a.members.split(","))
    title = f"stack ({'+'.join(members)}, {a.folds} folds, 2 rounds: base + 1 pseudo-label round)"
    rows = []
    for r in a.rows.split(","):
        rows.append(measure(fit, int(r), a.features, members, a.folds, a.overrides.split()))
        print_table(rows[-1:], f"{title}: {r} rows done")
    print_table(rows, title)
    print("<member>_s: fit + predict seconds of that member over all folds of the last round; overhead_pct = (stack "
          "total - sum of member fit+predict times over all rounds) / that sum")
    write_results("stacking_scale", {"members": members, "rows": rows})


if __name__ == "__main__":
    main()
