"""Rollout planning: phases, cohort steps, stable cohort ranks, and each device's desired models.

Rules this module enforces (pure: no storage, no transport, no clock):

- a rollout's steps are cohort fractions, strictly increasing, each in (0, 1], always ending at
  1.0 (the whole selection), so every rollout ends with every selected device on the candidate;
- a device's rank in a rollout is a stable hash of rollout id and device id, uniform in [0, 1):
  the same device keeps the same cohort across controller restarts, and a device that enrols
  mid-rollout lands in the step its rank says;
- a cohort of `fraction` of `n` devices holds ceil(fraction * n) of them (at least one), so a
  10% canary of 3 devices still tests the candidate on one device;
- desired state is a function of plain data: only an active rollout (Pending, Progressing,
  Paused) overrides a device's assignment; a finished rollout leaves the device to the newest
  assignment that matches it (a Completed rollout wrote that assignment; an Aborted or
  RolledBack one sends its devices back to the baseline, which is that assignment).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fleet.core.errors import InvalidInputError

# Enough for any sane staged rollout; more would only make the rollout slower, not safer.
MAX_STEPS = 20
# Floating-point products such as 0.7 * 10 come out as 7.000000000000001; without this slack
# ceil() would put one device too many in the cohort.
_EPS = 1e-9
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class Phase(str, Enum):
    """A rollout's phase. The strings are a public contract (REST, CLI, `-o json`)."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    COMPLETED = "Completed"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"

    def __str__(self) -> str:
        return self.value

    @property
    def is_finished(self) -> bool:
        """No further change will happen: the engine never touches a finished rollout again."""
        return self in (Phase.COMPLETED, Phase.ROLLED_BACK, Phase.ABORTED)

    @property
    def is_active(self) -> bool:
        """The rollout holds its model: its devices' desired state follows the rollout."""
        return not self.is_finished


class StepPhase(str, Enum):
    """Within one step: the new cohort first shadows the candidate, then serves it."""

    SHADOW = "Shadow"
    SERVING = "Serving"

    def __str__(self) -> str:
        return self.value


class DeviceRolloutState(str, Enum):
    """Where one device stands in one rollout."""

    PENDING = "Pending"  # not yet in a cohort that has started
    SHADOWING = "Shadowing"  # runs the candidate as shadow next to its baseline
    SERVING = "Serving"  # serves the candidate
    ROLLED_BACK = "RolledBack"  # sent back to its baseline
    FAILED = "Failed"  # its update to the candidate failed; it stays on its baseline

    def __str__(self) -> str:
        return self.value

    @property
    def has_candidate(self) -> bool:
        """The device's desired state names the candidate (shadow or serving)."""
        return self in (DeviceRolloutState.SHADOWING, DeviceRolloutState.SERVING)


# -- steps ----------------------------------------------------------------------------------------


def parse_percent(value: str | float | int, *, bare: str = "fraction") -> float:
    """Read a cohort share as a fraction in (0, 1].

    `"10%"` and `"12.5%"` are percentages; a bare number is a fraction (`"0.1"`) when
    `bare="fraction"` (the default) or a percentage when `bare="percent"` (used by step lists
    such as `5,25,100`). A bare number above 1 read as a fraction is refused rather than guessed:
    "10" could mean 10% or a typo.
    """
    if isinstance(value, bool):
        raise InvalidInputError(f"expected a percentage like '10%' or a fraction like '0.1', got {value!r}")
    text = str(value).strip()
    is_percent = text.endswith("%")
    number_text = text[:-1].strip() if is_percent else text
    try:
        number = float(number_text)
    except ValueError:
        raise InvalidInputError(
            f"expected a percentage like '10%' or a fraction like '0.1', got {text!r}"
        ) from None
    if not math.isfinite(number):
        raise InvalidInputError(f"{text!r} is not a finite number")
    if not is_percent and bare == "percent":
        is_percent = True
    elif not is_percent and number > 1:
        raise InvalidInputError(
            f"{text!r} is ambiguous: write a percentage with '%' ('{number:g}%') "
            f"or a fraction between 0 and 1 ('{number / 100:g}')"
        )
    fraction = number / 100 if is_percent else number
    if fraction <= 0:
        raise InvalidInputError(f"a cohort share must be more than 0%, got {text!r}")
    if fraction > 1 + _EPS:
        raise InvalidInputError(f"a cohort share cannot exceed 100%, got {text!r}")
    return min(fraction, 1.0)


def plan_steps(
    canary: str | float | None = None, steps: str | Sequence[str | float] | None = None
) -> list[float]:
    """The rollout's cohort fractions, strictly increasing and ending at 1.0.

    `canary="10%"` gives `[0.1, 1.0]`; `steps="5,25,100"` gives `[0.05, 0.25, 1.0]`; both
    together put the canary first (`canary="5%", steps="25,100"` gives `[0.05, 0.25, 1.0]`).
    Neither gives `[1.0]`: one step over the whole selection, still shadow-gated.
    In a step list, bare numbers are percentages when any of them is above 1 (`5,25,100`) and
    fractions otherwise (`0.05,0.25,1`); `%` can always be written explicitly.
    """
    planned: list[float] = []
    if canary is not None and str(canary).strip() != "":
        planned.append(parse_percent(canary))
    if steps is not None:
        items = _step_items(steps)
        if not items:
            raise InvalidInputError("--steps is empty: give cohort shares like '5,25,100' or '5%,25%'")
        bare_numbers = [_bare_number(item) for item in items]
        bare = "percent" if any(n is not None and n > 1 for n in bare_numbers) else "fraction"
        parsed = [parse_percent(item, bare=bare) for item in items]
        # `--canary 10% --steps 10,50,100`: the canary repeated as the first step is the same step.
        if planned and parsed and math.isclose(parsed[0], planned[0]):
            parsed = parsed[1:]
        planned.extend(parsed)
    if not planned:
        return [1.0]
    for before, after in itertools.pairwise(planned):
        if after <= before + _EPS:
            raise InvalidInputError(
                "rollout steps must grow strictly, got "
                + ", ".join(f"{p * 100:g}%" for p in planned)
                + (" (the canary comes first, so later steps must be larger)" if canary else "")
            )
    if planned[-1] < 1.0 - _EPS:
        planned.append(1.0)
    planned[-1] = 1.0
    if len(planned) > MAX_STEPS:
        raise InvalidInputError(f"a rollout has at most {MAX_STEPS} steps, got {len(planned)}")
    return planned


def _step_items(steps: str | Sequence[str | float]) -> list[str | float]:
    if isinstance(steps, str):
        return [part.strip() for part in steps.split(",") if part.strip()]
    return list(steps)


def _bare_number(item: str | float) -> float | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int | float):
        return float(item)
    text = item.strip()
    if text.endswith("%"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


# -- cohorts --------------------------------------------------------------------------------------


def cohort_rank(rollout_id: str, device_id: str) -> float:
    """A stable, uniform rank in [0, 1) of this device in this rollout."""
    # The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def cohort_size(fraction: float, n: int) -> int:
    """How many of `n` devices a step of `fraction` covers: ceil, at least 1, at most n."""
    if n <= 0 or fraction <= 0:
        return 0
    return max(1, min(n, math.ceil(fraction * n - _EPS)))


def step_for_rank(steps: Sequence[float], rank: float, upto: int) -> int | None:
    """The first step (at most `upto`) whose fraction covers `rank`, or None if none does yet.

    Used for devices that enrol after a step's cohort was drawn: they join the earliest step
    whose share is above their rank, so late devices spread over steps as the early ones did.
    """
    for index, fraction in enumerate(steps[: upto + 1]):
        if rank < fraction:
            return index
    return None


def parse_selector(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`"site=berlin,tier=edge"` (or a dict) as a label selector; empty matches every device.

    A dict value may also be a list of strings: the label must equal one of them.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, text_value = part.partition("=")
            if not sep:
                raise InvalidInputError(f"selector term {part!r} must be KEY=VALUE")
            items.append((key.strip(), text_value.strip()))
    selector: dict[str, Any] = {}
    for key, given in items:
        val: Any = given
        if not _LABEL_KEY_RE.match(key):
            raise InvalidInputError(
                f"selector key {key!r} must be 1-128 letters, digits, '.', '_', '/' or '-'"
            )
        if isinstance(val, list | tuple) and val and all(isinstance(v, str) for v in val):
            val = sorted(set(val))
        elif not isinstance(val, str):
            raise InvalidInputError(
                f"selector value for {key!r} must be a string or a non-empty list of strings, got {val!r}"
            )
        if key in selector:
            raise InvalidInputError(f"selector names {key!r} twice")
        selector[key] = val
    return selector


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, Any] | None) -> bool:
    """Every selector term must match: a string equals the label, a list names allowed values."""
    labels = labels or {}
    for key, want in (selector or {}).items():
        have = labels.get(key)
        if have is None:
            return False
        if isinstance(want, list | tuple | set | frozenset):
            if str(have) not in {str(w) for w in want}:
                return False
        elif str(have) != str(want):
            return False
    return True


# -- desired state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutMembership:
    """One rollout of a model as seen by one device (its state there, if it is a member)."""

    rollout: str
    model: str
    version: str  # the candidate
    phase: Phase | str
    shadow_sample_rate: float
    state: DeviceRolloutState | str | None = None  # None: the device is not (yet) a member
    baseline_version: str | None = None


@dataclass(frozen=True)
class AssignmentRecord:
    """"Devices matching `selector` run `model:version`"; the higher `order`, the newer."""

    model: str
    version: str
    selector: Mapping[str, Any] = field(default_factory=dict)
    order: Any = 0  # created_at or id: anything comparable; newest wins
    rollout: str | None = None


BundleRefLookup = Callable[[str, str], Mapping[str, Any]]


def newest_assignment(
    model: str, labels: Mapping[str, Any], assignments: Iterable[AssignmentRecord]
) -> AssignmentRecord | None:
    """The newest assignment of `model` whose selector matches these labels."""
    best: AssignmentRecord | None = None
    for record in assignments:
        if record.model != model or not selector_matches(record.selector, labels):
            continue
        if best is None or record.order >= best.order:
            best = record
    return best


def desired_for_device(
    labels: Mapping[str, Any],
    rollouts: Iterable[RolloutMembership],
    assignments: Iterable[AssignmentRecord],
    bundle_ref: BundleRefLookup,
) -> list[dict[str, Any]]:
    """The `models` list of one device's desired state (docs/ARCHITECTURE.md shape), by model name.

    - In an active rollout, Shadowing: serving = baseline, shadow = candidate. A device with no
      baseline has nothing to mirror from and no working model to lose, so it gets the candidate
      as serving at once (first installs).
    - In an active rollout, Serving: serving = candidate, no shadow.
    - Pending / RolledBack / Failed, not a member, or the rollout finished: serving = the newest
      matching assignment's version; no matching assignment: the model is absent.
    A Paused rollout is active, so its devices stay where they are.
    """
    assignments = list(assignments)
    active: dict[str, RolloutMembership] = {}
    for membership in rollouts:
        if not Phase(membership.phase).is_active:
            continue
        # At most one active rollout per model is allowed; if storage ever holds two, the one
        # where this device holds the candidate wins so the device is never pulled back and forth.
        current = active.get(membership.model)
        if current is None or (_holds_candidate(membership) and not _holds_candidate(current)):
            active[membership.model] = membership

    models = {a.model for a in assignments} | set(active)
    out: list[dict[str, Any]] = []
    for model in sorted(models):
        assignment = newest_assignment(model, labels, assignments)
        fallback = assignment.version if assignment else None
        entry: dict[str, Any] = {
            "model": model,
            "serving": None,
            "shadow": None,
            "shadow_sample_rate": 0.0,
            "rollout": (assignment.rollout or "") if assignment else "",
        }
        member = active.get(model)
        state = DeviceRolloutState(member.state) if member and member.state else None
        if member is not None and state is DeviceRolloutState.SHADOWING:
            baseline = member.baseline_version or fallback
            entry["rollout"] = member.rollout
            if baseline is None or baseline == member.version:
                entry["serving"] = dict(bundle_ref(model, member.version))
            else:
                entry["serving"] = dict(bundle_ref(model, baseline))
                entry["shadow"] = dict(bundle_ref(model, member.version))
                entry["shadow_sample_rate"] = float(member.shadow_sample_rate)
        elif member is not None and state is DeviceRolloutState.SERVING:
            entry["rollout"] = member.rollout
            entry["serving"] = dict(bundle_ref(model, member.version))
        elif fallback is not None:
            entry["serving"] = dict(bundle_ref(model, fallback))
        if entry["serving"] is None:
            continue  # nothing to run: the model is absent from this device's desired state
        out.append(entry)
    return out


def _holds_candidate(membership: RolloutMembership) -> bool:
    return membership.state is not None and DeviceRolloutState(membership.state).has_candidate
