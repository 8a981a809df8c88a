"""Temporal family: posting time as calendar fields and cyclic encodings (UTC)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.features.families import TEMPORAL, column_name
from popstack.features.state import FeatureState


def temporal_features(posts: pd.DataFrame, state: FeatureState) -> pd.DataFrame:
    """hour, weekday (Mon=0), week-hour (weekday*24+hour), day of year, month, days since the dataset start
    (the earliest training-run post), and sin/cos of hour, weekday and day of year."""
    t = pd.to_datetime(posts["postdate"].to_numpy(), unit="s", utc=True)
    key = f"{TEMPORAL}.start"
    if not state.fitted:
        state.meta[key] = int(posts["postdate"].min())
    start = state.meta[key]
    hour, weekday, doy = t.hour.to_numpy(), t.weekday.to_numpy(), t.dayofyear.to_numpy()
    cols = {
        "hour": hour, "weekday": weekday, "week_hour": weekday * 24 + hour, "day_of_year": doy,
        "month": t.month.to_numpy(), "days_since_start": (posts["postdate"].to_numpy() - start) / 86400.0,
        "hour_sin": np.sin(2 * np.pi * hour / 24), "hour_cos": np.cos(2 * np.pi * hour / 24),
        "weekday_sin": np.sin(2 * np.pi * weekday / 7), "weekday_cos": np.cos(2 * np.pi * weekday / 7),
        "doy_sin": np.sin(2 * np.pi * doy / 365.25), "doy_cos": np.cos(2 * np.pi * doy / 365.25),
    }
    return pd.DataFrame({column_name(TEMPORAL, k): np.asarray(v, dtype=np.float32) for k, v in cols.items()})
