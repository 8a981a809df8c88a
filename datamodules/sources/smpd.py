"""``data.kind=smpd``: a real SMPD download, read by ``datamodules.smpd.read_smpd`` (its layouts, its errors)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from popstack.datamodules.sources import DataSource, DataSourceError, postdate_range


class SmpdSource(DataSource):
    """A directory in the SMPD layout (``datamodules.smpd``); the whole directory is the run's outside input."""

    kind = "smpd"
    new_posts = "a directory in the SMPD layout (either or both splits; labels are ignored)"

    def check(self, data: Any) -> None:
        """``data.root`` is a directory holding SMPD train metadata."""
        from popstack.datamodules.smpd import SMPDFormatError, find_split

        root = Path(str(data.root)).expanduser()
        if not root.is_dir():
            raise DataSourceError(f"data.root {root} is not a directory")
        try:
            find_split(root.resolve(), "train")
        except SMPDFormatError as err:
            raise DataSourceError(f"data.root {root} does not look like SMPD data: {err}") from None

    def read_table(self, data: Any, where: Path, *, labels: bool) -> pd.DataFrame:
        from popstack.datamodules.smpd import read_smpd

        return read_smpd(where, check_images=bool(data.check_images), labels=labels,
                         postdate_range=postdate_range(data))

    def write_example(self, posts: pd.DataFrame, raw: Path, directory: Path) -> list[str]:
        """The SMPD directory itself, copied."""
        shutil.copytree(raw, directory / "smpd")
        return ["data=smpd", f"data.root={directory / 'smpd'}"]


SOURCE = SmpdSource()
