"""``data.kind=synthetic``: SMPD-format data made by ``datamodules.synthetic`` into ``data.root`` on first use
(atomically; a marker file says the folder is complete), then read like an SMPD download."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from popstack.datamodules.sources.smpd import SmpdSource
from popstack.datamodules.typed import setting

log = logging.getLogger("popstack")

#: The file that marks a generated folder as complete (it holds the generator's settings).
GENERATED_MARKER = ".popstack-generated"


@dataclass
class SyntheticConfig:
    """n_train, n_test: labelled and unlabelled posts. seed: the draw. world: structure of the latent model
    (``datamodules.synthetic_worlds``; 0 = the original). n_subcategories: of SMPD's 77. user_variant: A = the
    399/400-float description vectors, B = free text. naming: "2025" file names (_text, _user_data, ...) or "2020"
    (_tags, _userdata, ...)."""

    n_train: int = setting(2000, lo=1)
    n_test: int = setting(800, lo=0)
    seed: int = setting(0)
    world: int = setting(0, lo=0)
    n_subcategories: int = setting(20, lo=1)
    user_variant: str = setting("A", choices=("A", "B"))
    naming: str = setting("2025", choices=("2025", "2020"))


class SyntheticSource(SmpdSource):
    kind = "synthetic"
    Config = SyntheticConfig

    def locate(self, data: Any) -> Path:
        """``data.root``, generated there first when it holds no complete synthetic folder."""
        from popstack.datamodules.atomic import atomic_path
        from popstack.datamodules.synthetic import generate

        root = Path(str(data.root)).expanduser().resolve()
        if (root / GENERATED_MARKER).is_file():
            return root
        syn = data.synthetic
        log.info("generating synthetic SMPD data (%d train + %d test posts) in %s", syn.n_train, syn.n_test, root)
        with atomic_path(root) as tmp:
            generate(
                tmp, n_train=syn.n_train, n_test=syn.n_test, seed=syn.seed, n_subcategories=syn.n_subcategories,
                user_variant=syn.user_variant, naming=str(syn.naming), world=int(syn.world),
            )
            (tmp / GENERATED_MARKER).write_text(json.dumps({k: syn[k] for k in syn}))
        return root

    def check(self, data: Any) -> None:
        """Nothing to look at: the folder is generated when absent."""

    def write_example(self, posts: pd.DataFrame, raw: Path, directory: Path) -> list[str]:
        """The generated SMPD directory, copied with its marker (so it is read, not generated again)."""
        shutil.copytree(raw, directory / "synthetic")
        marker = directory / "synthetic" / GENERATED_MARKER
        if not marker.is_file():
            marker.write_text(json.dumps(asdict(SyntheticConfig())))
        return ["data=synthetic", f"data.root={directory / 'synthetic'}"]


SOURCE = SyntheticSource()
