"""User-facing errors: the entry points print these as one line and exit non-zero, with no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (paths, data, config, checkpoints), not a bug in popstack."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type that means "the user's input is wrong" across the rooms."""
    from hydra.errors import HydraException

    from popstack.datamodules.smpd import SMPDFormatError
    from popstack.datamodules.sources import DataSourceError
    from popstack.lightning_modules.backbone import BackboneWeightsError
    from popstack.stacking.members import MemberResourceError

    return (UserError, SMPDFormatError, DataSourceError, BackboneWeightsError, HydraException, MemberResourceError)
