"""The stack's settings: the typed config of the Hydra group ``stacking/`` (its defaults and rules, written once).

``members`` has one entry per registered member (``stacking.members.MEMBERS``), each that member's params dataclass
(declared beside it), so a new member file is a new ``stacking.members.<name>`` section without an edit here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from popstack.datamodules.typed import setting
from popstack.stacking.blend import METHODS as BLEND_METHODS
from popstack.stacking.members import MEMBERS, MemberParams, member_params

#: HyperFusion Table 1's ablation variants (``stacking.ablation``).
VARIANTS = ("full", "w/o visual", "w/o metadata", "w/o textual", "w/o geolocation", "w/o ensemble",
            "w/o pseudo label", "w/o filter", "w/o 5-fold")


def _registered(value: Any) -> str | None:
    return None if value in MEMBERS else f"one of {', '.join(MEMBERS)}"


def _registered_list(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and all(v in MEMBERS for v in value)
    return None if ok else f"a list of {', '.join(MEMBERS)}"


def _variants(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and all(v in VARIANTS for v in value)
    return None if ok else f"a list of {', '.join(VARIANTS)}"


def _auto_or_count(value: Any) -> str | None:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "auto or an integer >= 1"


#: One field per registered member: its params dataclass with its defaults.
MembersConfig = dataclasses.make_dataclass(
    "MembersConfig", [(name, cls.Params, field(default_factory=cls.Params)) for name, cls in MEMBERS.items()],
    namespace={"__module__": __name__,
               "__doc__": "The stack's tabular members by registered name (``stacking.members.MEMBERS``)."})


def members_config(params: dict[str, MemberParams | dict[str, Any]]) -> Any:
    """A ``MembersConfig`` with exactly the members named in ``params`` enabled, each with its params (a dict: its
    keys over the member's defaults); every other registered member is off."""
    unknown = sorted(set(params) - set(MEMBERS))
    if unknown:
        raise ValueError(f"unknown member {', '.join(unknown)}; members are {', '.join(MEMBERS)}")
    return MembersConfig(**{n: dataclasses.replace(member_params(n, params[n]), enabled=True) if n in params
                            else cls.Params(enabled=False) for n, cls in MEMBERS.items()})


@dataclass
class GuardConfig:
    """Members that cannot explode (``stacking.stack``, guards).

    label_margin: a neural member's predictions are clipped to the training label range widened by this share of
        its width on each side.
    max_outside: a member is left out of the blend (one console line and a row in report.md) when more than this
        share of its test predictions leave that range,
    max_error_ratio: or when its MAE on the latest validation rows (the last 1/n_folds of the rows with a fold, by
        date; never the held-back slice) is more than this times both its MAE on the earlier validation rows and
        the best member's there.
    """

    label_margin: float = setting(0.1, lo=0)
    max_outside: float = setting(0.01, lo=0, hi=1)
    max_error_ratio: float = setting(1.5, lo=1)


@dataclass
class AblationConfig:
    """HyperFusion Table 1 ablations: opt-in (they refit the stack once per variant).

    enabled: run them after the stack. On a finished run only the stack and report stages rerun:
        ``python train.py experiment=ablations run_dir=RUN`` (configs/experiment/ablations.yaml).
    members: the members each variant fits; [] = all of the run's members.
    variants: which of ``VARIANTS`` to run.
    """

    enabled: bool = setting(False)
    members: list[str] = setting(["lightgbm"], check=_registered_list)
    variants: list[str] = setting(list(VARIANTS), check=_variants)


@dataclass
class StackConfig:
    """K-fold stack (HyperFusion §3.4-3.5); ``stacking.stack`` says what each step does.

    members: the tabular members, one section per registered member (its params dataclass: the library's
        parameters, ``enabled``, ``extra``). Members converge rather than run fixed schedules: round counts are
        caps and early stopping on the fold's validation part ends each fit.
    n_jobs: (fold, member) fits at once: auto (cores / threads per fit: small folds fill every core with one-thread
        fits, a large fit keeps every core) or an integer (1 = one at a time).
    use_neural_members: the neural modules' out-of-fold predictions join the blend as members.
    blend: caruana | mae | spearman | ridge (level-2 model); caruana_size: greedy steps.
    pseudo_rounds: HyperFusion's iterative pseudo-labelling rounds (§3.5; the count is ours: experiment=hyperfusion
        2); each round refits the whole stack.
    pseudo_alpha: ours: alpha of tau = mu + alpha * sigma (eq. 10 gives no value); confidence (ours, the paper does
        not define it) = 1 / spread of the fold's members' predictions.
    iqr_k: ours: IQR fences on training labels (0 = off); HyperFusion §3.3 names IQR filtering but no k.
    selection_fraction: loss-based selection: share of training rows kept (CMPA-DGPL §4.2's speed trade-off: 0.77).
    selection_member: ranks rows for selection only when the prompt/prototype module (its class loss) is off.
    ablation, guard: ``AblationConfig``, ``GuardConfig``.
    refit_full: AutoGluon's refit_full: after validation, the tree members are refitted on every labelled post (the
        held-back slice included) with their best round counts scaled to the larger data, for the test predictions;
        blend weights stay the folds'. The report's scores are the validation ones, from before the refit.
    """

    members: MembersConfig = field(default_factory=MembersConfig)  # type: ignore[valid-type]
    n_jobs: int | str = setting("auto", check=_auto_or_count)
    use_neural_members: bool = setting(True)
    blend: str = setting("caruana", choices=BLEND_METHODS)
    caruana_size: int = setting(25, lo=1)
    pseudo_rounds: int = setting(0, lo=0)
    pseudo_alpha: float = setting(1.0)
    iqr_k: float = setting(3.0, lo=0)
    selection_fraction: float = setting(1.0, lo=0, hi=1, lo_open=True)
    selection_member: str = setting("lightgbm", check=_registered)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    refit_full: bool = setting(True)
    #: Not keys of the group: the stack stage passes the run's neural prediction columns and ``seed``.
    neural_columns: list[str] = field(default_factory=list, metadata={"omegaconf_ignore": True})
    seed: int = field(default=0, metadata={"omegaconf_ignore": True})

    def fitted_members(self) -> dict[str, MemberParams]:
        """The enabled tabular members' params by name, in the order of ``members``' fields (the registry's)."""
        return {f.name: getattr(self.members, f.name) for f in dataclasses.fields(self.members)
                if getattr(self.members, f.name).enabled}

    def params(self, name: str) -> MemberParams:
        """Member ``name``'s params (enabled or not)."""
        return getattr(self.members, name)

    def only(self, names: list[str]) -> "StackConfig":
        """A copy with only the members ``names`` enabled (their params unchanged)."""
        members = {f.name: dataclasses.replace(getattr(self.members, f.name), enabled=f.name in names)
                   for f in dataclasses.fields(self.members)}
        return dataclasses.replace(self, members=type(self.members)(**members))
