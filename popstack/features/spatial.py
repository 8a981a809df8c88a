"""Spatial family: coordinates (NaN when missing) with a has-geo flag, geo accuracy, location description."""

from __future__ import annotations

import numpy as np
import pandas as pd

from popstack.features.config import FeatureConfig
from popstack.features.families import SPATIAL, column_name
from popstack.features.reduce import vector_block
from popstack.features.state import FeatureState


def spatial_features(posts: pd.DataFrame, state: FeatureState, cfg: FeatureConfig) -> pd.DataFrame:
    lat = posts["latitude"].to_numpy(dtype=np.float64)
    lon = posts["longitude"].to_numpy(dtype=np.float64)
    has_geo = ~np.isnan(lat) & ~np.isnan(lon)
    cols = {
        "latitude": lat, "longitude": lon, "has_geo": has_geo, "geoaccuracy": posts["geoaccuracy"].to_numpy(),
        # unit-sphere coordinates let trees and MLPs see that -179 and 179 degrees are neighbours
        "geo_x": np.cos(np.radians(lat)) * np.cos(np.radians(lon)),
        "geo_y": np.cos(np.radians(lat)) * np.sin(np.radians(lon)),
        "geo_z": np.sin(np.radians(lat)),
    }
    out = pd.DataFrame({column_name(SPATIAL, k): np.asarray(v, dtype=np.float32) for k, v in cols.items()})
    vec = vector_block(posts, "location_vector", "location_vec", cfg.location_vector_dim, state, cfg.seed,
                        family=SPATIAL)
    return out if vec is None else pd.concat([out, vec], axis=1)
