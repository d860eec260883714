"""GitOps: `ModelRollout` custom resources run as rollouts, with their status written back.

A team commits a `ModelRollout` (group `fleet.edge-fleet.dev`) to Git; Argo CD or Flux applies
it; the controller's leader replica watches these objects and runs each as a rollout through the
same operations the REST API uses (`fleet.controller.rollouts`), so every rule of a rollout holds
(one unfinished rollout per model, operator actions recorded as decisions).

Rules this module enforces:

- a spec is checked in full before anything happens (unknown fields, names, steps, selector,
  gate); a refused spec changes nothing and says why in `status` (condition Stalled, reason
  InvalidSpec);
- `reconcile_resource` is idempotent and keeps no memory of its own: the database says which
  rollout belongs to which resource (`Rollout.created_by == "gitops:<namespace>/<name>"`, the
  newest one is the resource's current rollout), so a lost status patch or a controller restart
  never starts a second rollout;
- a resource starts a rollout when it has none, or when `spec.model`/`spec.version` differ from
  its current rollout and that rollout has finished; while it runs, the new version waits and the
  status says why. Changes of steps, selector, gate or sample rate apply to the next rollout only
  (a running rollout keeps the plan its cohorts were drawn with);
- `spec.paused: true` pauses the current rollout (and re-pauses it if someone resumes it by hand:
  Git is the source of truth); `spec.paused: false` resumes it only if this resource paused it, so
  a pause by the engine (inconclusive evidence, missed deadline) or by an operator is never undone
  behind their back; `spec.abort: true` aborts the current rollout and starts no new one;
- deleting a resource leaves its rollout alone (no finalizer): `fleet rollout abort` stops it;
- the status follows the kstatus conventions Flux and Argo CD read: `observedGeneration`, and
  conditions `Ready` (the spec's rollout Completed), `Reconciling` (it is on its way) and `Stalled`
  (it cannot go on without a change: invalid spec, RolledBack, Aborted). A condition's
  `lastTransitionTime` changes only when its status does, so an unchanged rollout gives an
  identical status and the loop writes nothing.

`GitOpsLoop` lists and watches the resources through the thin `fleet.controller.k8s.KubeApi`,
reconciles each change at once, re-syncs every resource's status each `resync_s` (so status
follows the rollout as the engine moves it), relists on 410 Gone, and backs off on API errors.
It works only while this replica is the leader.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.controller import rollouts as ops
from fleet.controller.k8s import HTTP_NOT_FOUND, KIND, GoneError, KubeApi, KubeApiError
from fleet.controller.models import Decision, Rollout
from fleet.core.errors import ConflictError, FleetError, InvalidInputError, NotFoundError
from fleet.core.gate import GatePolicy
from fleet.core.manifest import NAME_RE, VERSION_RE
from fleet.core.rollout import Phase, parse_selector, plan_steps

if TYPE_CHECKING:
    from fleet.controller.context import ControllerContext

log = logging.getLogger(__name__)

# Optional annotation: the name of the rollout this resource creates (default gitops-<namespace>-<name>).
ROLLOUT_NAME_ANNOTATION = "fleet.edge-fleet.dev/rollout-name"
OWNER_PREFIX = "gitops:"
# Reasons of pauses this module makes start with this, so it resumes only its own pauses.
PAUSE_MARK = "spec.paused is true in ModelRollout"
ABORT_MARK = "spec.abort is true in ModelRollout"
# The CR's phase when its spec is refused and it has no rollout to show.
PHASE_INVALID = "Invalid"
MAX_ROLLOUT_ID = 128
MAX_OWNER = 128
MAX_STATUS_MESSAGE = 1024
SPEC_FIELDS = frozenset(
    {"model", "version", "canary", "steps", "selector", "gate", "shadowSampleRate", "paused", "abort"}
)
_CAMEL_RE = re.compile(r"(?<!^)(?=[A-Z])")
_ROLLOUT_ID_BAD = re.compile(r"[^A-Za-z0-9._-]")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


# -- the spec -------------------------------------------------------------------------------------


def _selector_from(raw: Any) -> dict[str, Any]:
    """A Kubernetes label selector (`matchLabels`, `matchExpressions` with `In`) as a rollout selector."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInputError("spec.selector must be an object with matchLabels and/or matchExpressions")
    unknown = sorted(set(raw) - {"matchLabels", "matchExpressions"})
    if unknown:
        raise InvalidInputError(f"spec.selector has unknown field(s) {', '.join(unknown)}; "
                                "use matchLabels and/or matchExpressions")
    terms: dict[str, Any] = {}
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise InvalidInputError("spec.selector.matchLabels must map label keys to values")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise InvalidInputError(f"spec.selector.matchLabels.{key} must be a string, got {value!r}")
        terms[str(key)] = value
    expressions = raw.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise InvalidInputError("spec.selector.matchExpressions must be a list")
    for index, expr in enumerate(expressions):
        where = f"spec.selector.matchExpressions[{index}]"
        if not isinstance(expr, Mapping):
            raise InvalidInputError(f"{where} must be an object with key, operator and values")
        key, operator, values = expr.get("key"), expr.get("operator"), expr.get("values")
        # Device selection is equality on labels (a value or a list of allowed values): `In` maps
        # onto it exactly; NotIn/Exists/DoesNotExist have no equivalent and are refused, not guessed.
        if operator != "In":
            raise InvalidInputError(f"{where}.operator must be In (the only operator device selection "
                                    f"supports), got {operator!r}")
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"{where}.key must be a label key")
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise InvalidInputError(f"{where}.values must be a non-empty list of strings")
        if key in terms:
            raise InvalidInputError(f"spec.selector names label {key!r} twice")
        terms[key] = list(values)
    return parse_selector(terms)


def _gate_from(raw: Any) -> dict[str, Any]:
    """The gate policy; Kubernetes-style camelCase keys (`minSamples`) and snake_case both work."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInputError("spec.gate must be an object of gate settings, e.g. {minSamples: 500}")
    settings = {_CAMEL_RE.sub("_", str(key)).lower(): value for key, value in raw.items()}
    try:
        return GatePolicy.from_dict(settings).to_dict()
    except TypeError as exc:  # a value of the wrong type reaching the dataclass
        raise InvalidInputError(f"spec.gate is invalid: {exc}") from None


@dataclass(frozen=True)
class ModelRolloutSpec:
    """A validated `ModelRollout.spec`."""

    model: str
    version: str
    steps: tuple[float, ...]
    selector: dict[str, Any]
    gate: dict[str, Any]
    shadow_sample_rate: float | None
    paused: bool
    abort: bool

    @classmethod
    def from_resource(cls, resource: Mapping[str, Any]) -> ModelRolloutSpec:
        """Parse and check `resource["spec"]`; InvalidInputError names the field at fault."""
        spec = resource.get("spec")
        if not isinstance(spec, Mapping):
            raise InvalidInputError("the ModelRollout has no spec: give at least spec.model and spec.version")
        unknown = sorted(set(spec) - SPEC_FIELDS)
        if unknown:
            # A typo such as `pasued: true` silently ignored would be worse than a refusal.
            raise InvalidInputError(f"spec has unknown field(s) {', '.join(unknown)}; "
                                    f"known: {', '.join(sorted(SPEC_FIELDS))}")
        model, version = spec.get("model"), spec.get("version")
        if not isinstance(model, str) or not NAME_RE.match(model):
            raise InvalidInputError(f"spec.model must be a model name (lowercase letters, digits, '.', '_', '-'; "
                                    f"at most 63), got {model!r}")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise InvalidInputError(f"spec.version must be a version such as 'v3' (letters, digits, '.', '_', "
                                    f"'+', '-'; at most 63), got {version!r}")
        canary = spec.get("canary")
        if canary is not None and (isinstance(canary, bool) or not isinstance(canary, str | int | float)):
            raise InvalidInputError(f"spec.canary must be a share like '10%' or 0.1, got {canary!r}")
        steps = spec.get("steps")
        if steps is not None and not isinstance(steps, str | list):
            raise InvalidInputError(f"spec.steps must be a list of shares like ['5%', '25%', '100%'], got {steps!r}")
        if isinstance(steps, list) and not all(
            isinstance(s, str | int | float) and not isinstance(s, bool) for s in steps
        ):
            raise InvalidInputError(f"spec.steps items must be shares like '25%' or 0.25, got {steps!r}")
        planned = plan_steps(canary, steps)
        rate = spec.get("shadowSampleRate")
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1
        ):
            raise InvalidInputError(f"spec.shadowSampleRate must be a number in (0, 1], got {rate!r}")
        flags = {}
        for field_name in ("paused", "abort"):
            value = spec.get(field_name, False)
            if value is None:
                value = False
            if not isinstance(value, bool):
                raise InvalidInputError(f"spec.{field_name} must be true or false, got {value!r}")
            flags[field_name] = value
        return cls(
            model=model, version=version, steps=tuple(planned), selector=_selector_from(spec.get("selector")),
            gate=_gate_from(spec.get("gate")), shadow_sample_rate=None if rate is None else float(rate),
            paused=flags["paused"], abort=flags["abort"],
        )

    def wants(self, rollout: Rollout) -> bool:
        """Whether `rollout` rolls out what this spec asks for."""
        return rollout.model == self.model and rollout.version == self.version


# -- identity -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceRef:
    namespace: str
    name: str
    generation: int

    @classmethod
    def of(cls, resource: Mapping[str, Any]) -> ResourceRef:
        meta = resource.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        if not isinstance(namespace, str) or not namespace or not isinstance(name, str) or not name:
            raise InvalidInputError("a ModelRollout must have metadata.namespace and metadata.name")
        generation = meta.get("generation") or 0
        return cls(namespace, name, int(generation))

    @property
    def text(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def owner(self) -> str:
        """`Rollout.created_by` of this resource's rollouts."""
        return _capped(f"{OWNER_PREFIX}{self.text}", MAX_OWNER, self.text)


def _capped(text: str, limit: int, key: str) -> str:
    """`text`, or its head plus a hash of `key` when it is too long (still unique, still readable)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{text[: limit - 11]}-{digest}"


def current_rollout(session: Session, ref: ResourceRef) -> Rollout | None:
    """The newest rollout this resource created, if any."""
    return session.scalar(
        select(Rollout).where(Rollout.created_by == ref.owner)
        .order_by(Rollout.created_at.desc(), Rollout.id.desc()).limit(1)
    )


def _new_rollout_id(session: Session, ref: ResourceRef, resource: Mapping[str, Any]) -> str:
    annotations = (resource.get("metadata") or {}).get("annotations") or {}
    wanted = annotations.get(ROLLOUT_NAME_ANNOTATION)
    base = wanted if isinstance(wanted, str) and wanted.strip() else f"gitops-{ref.namespace}-{ref.name}"
    base = _capped(_ROLLOUT_ID_BAD.sub("-", base.strip()), MAX_ROLLOUT_ID - 12, ref.text)
    # Later rollouts of the same resource carry the generation that asked for them.
    for candidate in (base, f"{base}-g{ref.generation}"):
        if session.get(Rollout, candidate) is None:
            return candidate
    n = 2
    while session.get(Rollout, f"{base}-g{ref.generation}-{n}") is not None:
        n += 1
    return f"{base}-g{ref.generation}-{n}"


def _we_paused(session: Session, rollout: Rollout) -> bool:
    """Whether the rollout's latest pause was made by a ModelRollout's spec.paused."""
    latest = session.scalar(
        select(Decision).where(Decision.rollout_id == rollout.id, Decision.kind == "pause")
        .order_by(Decision.at.desc(), Decision.id.desc()).limit(1)
    )
    return latest is not None and latest.reason.startswith(PAUSE_MARK)


# -- status ---------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What one reconcile found: the rollout to report on and how the spec stands."""

    # The rollout the status shows; None while the spec's rollout cannot start yet (the message
    # names what holds it back).
    rollout: Rollout | None
    # None: the status reports the rollout as it is. Otherwise the spec is not (yet) realised:
    # (phase, Ready/Reconciling/Stalled reason, reconciling?, stalled?).
    override: tuple[str, str, bool, bool] | None = None
    message: str = ""


def _conditions_for(outcome: _Outcome) -> tuple[str, list[tuple[str, bool, str]]]:
    """(phase, [(type, status, reason)]) following kstatus: Ready, Reconciling, Stalled."""
    if outcome.override is not None:
        phase, reason, reconciling, stalled = outcome.override
        return phase, [("Ready", False, reason), ("Reconciling", reconciling, reason), ("Stalled", stalled, reason)]
    assert outcome.rollout is not None
    phase = outcome.rollout.phase
    p = Phase(phase)
    return phase, [
        ("Ready", p is Phase.COMPLETED, phase),
        ("Reconciling", p in (Phase.PENDING, Phase.PROGRESSING), phase),
        ("Stalled", p in (Phase.ROLLED_BACK, Phase.ABORTED), phase),
    ]


def _last_decision(session: Session, rollout: Rollout | None) -> dict[str, Any]:
    # Every key always present: the status is written as a merge patch, so a key left out would
    # keep its old value instead of disappearing.
    empty = {"at": "", "kind": "", "verdict": "", "actor": "", "reason": "", "step": 0}
    if rollout is None:
        return empty
    decision = session.scalar(
        select(Decision).where(Decision.rollout_id == rollout.id)
        .order_by(Decision.at.desc(), Decision.id.desc()).limit(1)
    )
    if decision is None:
        return empty
    return {
        "at": _iso(decision.at), "kind": decision.kind, "verdict": decision.verdict or "",
        "actor": decision.actor, "reason": decision.reason[:MAX_STATUS_MESSAGE], "step": decision.step_index + 1,
    }


def _status(
    session: Session, ref: ResourceRef, previous: Mapping[str, Any], outcome: _Outcome, now: datetime
) -> dict[str, Any]:
    phase, conditions = _conditions_for(outcome)
    rollout = outcome.rollout
    message = outcome.message or (rollout.message if rollout is not None else "")
    before = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}
    written = []
    for kind, value, reason in conditions:
        status_text = "True" if value else "False"
        old = before.get(kind) or {}
        # Kubernetes convention: the transition time moves only when the status flips.
        since = old.get("lastTransitionTime") if old.get("status") == status_text else None
        written.append({
            "type": kind, "status": status_text, "reason": reason, "message": message[:MAX_STATUS_MESSAGE],
            "lastTransitionTime": since or now.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "observedGeneration": ref.generation,
        })
    return {
        "phase": phase,
        "rollout": rollout.id if rollout is not None else "",
        "model": rollout.model if rollout is not None else "",
        "version": rollout.version if rollout is not None else "",
        "step": rollout.step_index + 1 if rollout is not None else 0,
        "stepCount": len(rollout.steps) if rollout is not None else 0,
        "stepPhase": rollout.step_phase if rollout is not None else "",
        "message": message[:MAX_STATUS_MESSAGE],
        "observedGeneration": ref.generation,
        "conditions": written,
        "lastDecision": _last_decision(session, rollout),
    }


# -- reconcile ------------------------------------------------------------------------------------


def reconcile_resource(
    ctx: ControllerContext, session: Session, resource: Mapping[str, Any], *, now: datetime | None = None
) -> dict[str, Any]:
    """Bring the resource's rollout in line with its spec; return the status to write back.

    Ordered, idempotent steps, each returning early when there is nothing to do. Takes a
    `Session` and never commits: the caller owns the transaction (and commits before writing
    the status, so the status never names a rollout the database does not have).
    """
    now = now or _utcnow()
    ref = ResourceRef.of(resource)
    previous = resource.get("status") or {}
    current = current_rollout(session, ref)
    try:
        spec = ModelRolloutSpec.from_resource(resource)
    except InvalidInputError as exc:
        return _status(session, ref, previous, _invalid(current, exc), now)

    outcome = _reconcile_abort(ctx, session, ref=ref, spec=spec, current=current, now=now)
    if outcome is None:
        outcome = _reconcile_create(ctx, session, ref=ref, resource=resource, spec=spec, current=current, now=now)
    if outcome is None:
        assert current is not None  # _reconcile_create returns None only when the spec's rollout exists
        outcome = _reconcile_pause(ctx, session, ref=ref, spec=spec, current=current, now=now)
    return _status(session, ref, previous, outcome, now)


def _invalid(current: Rollout | None, exc: FleetError) -> _Outcome:
    if current is None:
        return _Outcome(None, (PHASE_INVALID, "InvalidSpec", False, True), f"spec refused: {exc}")
    return _Outcome(current, (current.phase, "InvalidSpec", False, True),
                    f"spec refused: {exc}; rollout {current.id} is left as it was ({current.phase})")


def _reconcile_abort(
    ctx: ControllerContext, session: Session, *, ref: ResourceRef, spec: ModelRolloutSpec, current: Rollout | None,
    now: datetime,
) -> _Outcome | None:
    if not spec.abort:
        return None
    if current is None:
        return _Outcome(None, (Phase.ABORTED.value, "Aborted", False, True),
                        "spec.abort is true: no rollout was started; set it to false to start one")
    if not Phase(current.phase).is_finished:
        ops.abort_rollout(ctx, session, current.id, f"{ABORT_MARK} {ref.text}", now=now)
    # Finished (just now or before): nothing new starts while abort is set.
    return _Outcome(current, None, f"spec.abort is true: rollout {current.id} is {current.phase}; no new "
                                   "rollout starts until spec.abort is false")


def _reconcile_create(
    ctx: ControllerContext, session: Session, *, ref: ResourceRef, resource: Mapping[str, Any],
    spec: ModelRolloutSpec, current: Rollout | None, now: datetime,
) -> _Outcome | None:
    if current is not None and spec.wants(current):
        return None  # the spec's rollout exists: pause/resume decide the rest
    if current is not None and not Phase(current.phase).is_finished:
        return _Outcome(None, ("Pending", "WaitingForPrevious", True, False),
                        f"waiting: rollout {current.id} ({current.model}:{current.version}) is {current.phase}; "
                        f"{spec.model}:{spec.version} starts when it finishes (or set spec.abort to stop it)")
    name = _new_rollout_id(session, ref, resource)
    try:
        ops.create_rollout(
            ctx, session, model=spec.model, version=spec.version, steps=list(spec.steps), selector=spec.selector,
            gate=spec.gate, shadow_sample_rate=spec.shadow_sample_rate, name=name, created_by=ref.owner[:128],
            now=now,
        )
    except NotFoundError as exc:
        return _Outcome(None, ("Pending", "VersionNotFound", True, False), f"waiting: {exc}")
    except ConflictError as exc:
        return _Outcome(None, ("Pending", "ModelBusy", True, False), f"waiting: {exc}")
    except InvalidInputError as exc:
        return _invalid(current, exc)
    rollout = session.get(Rollout, name)
    assert rollout is not None
    log.info("ModelRollout %s: created rollout %s (%s:%s)", ref.text, name, spec.model, spec.version)
    if spec.paused:
        ops.pause_rollout(ctx, session, name, f"{PAUSE_MARK} {ref.text}", now=now)
    return _Outcome(rollout)


def _reconcile_pause(
    ctx: ControllerContext, session: Session, *, ref: ResourceRef, spec: ModelRolloutSpec, current: Rollout,
    now: datetime,
) -> _Outcome:
    phase = Phase(current.phase)
    if phase.is_finished:
        if phase is not Phase.COMPLETED:
            return _Outcome(current, None, f"rollout {current.id} ended {phase.value}: {current.message}; "
                                           "change spec.version to roll out another version")
        return _Outcome(current)
    if spec.paused and phase is not Phase.PAUSED:
        ops.pause_rollout(ctx, session, current.id, f"{PAUSE_MARK} {ref.text}", now=now)
    elif not spec.paused and phase is Phase.PAUSED and _we_paused(session, current):
        ops.resume_rollout(ctx, session, current.id, f"spec.paused is false in ModelRollout {ref.text}", now=now)
    return _Outcome(current)


# -- the loop -------------------------------------------------------------------------------------


def _key(resource: Mapping[str, Any]) -> tuple[str, str]:
    meta = resource.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class GitOpsLoop:
    """Lists and watches ModelRollouts, reconciles them and writes their status back.

    Runs on a thread of its own (the Kubernetes client blocks); `run` starts it from asyncio.
    Only the leader replica works: a follower waits, and relists when it becomes leader.
    """

    def __init__(
        self,
        ctx: ControllerContext,
        api_factory: Callable[[], KubeApi],
        *,
        namespace: str | None = None,
        resync_s: float = 10.0,
        is_leader: Callable[[], bool] = lambda: True,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.api_factory = api_factory
        self.namespace = namespace or None
        self.resync_s = resync_s
        self.is_leader = is_leader
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self._api: KubeApi | None = None
        self._cache: dict[tuple[str, str], dict[str, Any]] = {}
        self._resource_version: str | None = None
        self._last_resync = float("-inf")
        self.thread: threading.Thread | None = None
        # Counters for logs and tests.
        self.lists = 0
        self.patches = 0
        self.api_errors = 0
        self.reconcile_errors = 0

    # -- one resource -----------------------------------------------------------------------------

    def handle(self, api: KubeApi, resource: dict[str, Any]) -> None:
        """Reconcile one resource and write its status if it changed.

        A database or domain failure is logged and retried at the next re-sync; a Kubernetes API
        failure propagates (the loop backs off and relists), except 404: the resource is gone.
        """
        key = _key(resource)
        try:
            with self.ctx.session_factory() as session, session.begin():
                status = reconcile_resource(self.ctx, session, resource)
        except Exception:
            self.reconcile_errors += 1
            log.exception("ModelRollout %s/%s: reconcile failed; retrying at the next re-sync", *key)
            return
        if status == resource.get("status"):
            return
        try:
            updated = api.patch_status(key[0], key[1], status)
        except KubeApiError as exc:
            if exc.status == HTTP_NOT_FOUND:
                self._cache.pop(key, None)
                return
            raise
        self.patches += 1
        self._cache[key] = updated if updated.get("metadata") else {**resource, "status": status}

    def resync(self, api: KubeApi) -> None:
        """Reconcile every known resource: status follows rollouts the engine moves meanwhile."""
        self._last_resync = self.clock()
        for resource in list(self._cache.values()):
            if not self.is_leader():
                return
            self.handle(api, resource)

    # -- list and watch ---------------------------------------------------------------------------

    def _client(self) -> KubeApi:
        if self._api is None:
            self._api = self.api_factory()
        return self._api

    def sync_once(self, stop: threading.Event) -> None:
        """List if needed, re-sync if due, then follow one watch stream until it ends."""
        api = self._client()
        if self._resource_version is None:
            items, version = api.list_rollouts(self.namespace)
            self.lists += 1
            self._cache = {_key(item): dict(item) for item in items}
            self._resource_version = version
            self._last_resync = float("-inf")
        if self.clock() - self._last_resync >= self.resync_s:
            self.resync(api)
        timeout = max(0.05, self.resync_s - (self.clock() - self._last_resync))
        for event in api.watch_rollouts(self.namespace, self._resource_version, timeout):
            if event.resource_version:
                self._resource_version = event.resource_version
            if event.type in ("ADDED", "MODIFIED"):
                self._cache[_key(event.object)] = event.object
                if self.is_leader():
                    self.handle(api, event.object)
            elif event.type == "DELETED":
                self._cache.pop(_key(event.object), None)
            if stop.is_set() or not self.is_leader():
                return
            # A busy stream must not starve the re-sync.
            if self.clock() - self._last_resync >= self.resync_s:
                self.resync(api)

    def run_blocking(self, stop: threading.Event) -> None:
        backoff = self.backoff_initial_s
        while not stop.is_set():
            if not self.is_leader():
                # Another replica may change statuses while we follow: relist on taking over.
                self._resource_version = None
                stop.wait(min(1.0, self.resync_s))
                continue
            try:
                self.sync_once(stop)
                backoff = self.backoff_initial_s
            except GoneError:
                log.info("ModelRollout watch expired (410 Gone); listing again")
                self._resource_version = None
            except Exception as exc:
                self.api_errors += 1
                self._resource_version = None
                log.warning("Kubernetes API failed (%s); retrying in %.1fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    def start(self) -> threading.Event:
        """Start the worker thread; set the returned event to stop it."""
        stop = threading.Event()
        self.thread = threading.Thread(target=self.run_blocking, args=(stop,), name="fleet-gitops", daemon=True)
        self.thread.start()
        return stop

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set (or the task is cancelled)."""
        log.info("GitOps: watching %s objects in %s", KIND, self.namespace or "all namespaces")
        thread_stop = self.start()
        try:
            await stop.wait()
        finally:
            # The thread ends after its current API call (a watch ends within resync_s); it is a
            # daemon, so shutdown does not wait for it.
            thread_stop.set()
