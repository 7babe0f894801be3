"""The planner: which providers a call tries, in which order, and why the others are skipped.

A pure function of what is known about each provider (:class:`SlotView`) and the call's cold-start
policy: no I/O, no clock, no side effects, so every rule is table-tested (tests/test_planner.py).
The executor (:mod:`service.routing.router`) walks the plan; it alone claims half-open probes and
starts wake-ups, both named in the plan.

Rules, per provider in chain order:

* outside the caller's tenant policy -> skip ``not_allowed`` (never tried, not even as a last
  resort; when that leaves nothing, the call is PERMISSION_DENIED);
* not started (its start-up failed; retried in the background) -> skip ``not_started``;
* known not to serve the requested model -> skip ``model_not_served`` (never tried: asking would
  only fail, and a caller's model choice is not a provider failure);
* the request has images and the provider reads text only -> skip ``no_image_input``;
* its monthly budget is spent -> skip ``budget_exhausted`` (never a last resort: a GPU it cannot
  afford is never woken; when that leaves nothing the call is RESOURCE_EXHAUSTED);
* cold or warming (scale-to-zero) -> under policy ``wait``, or when nothing else could serve, a
  step that waits for the start; otherwise skip ``cold``/``warming`` and wake it. This wins over a
  half-open circuit: a cold Modal is never handed a real caller as its probe under ``fallback``;
* circuit open -> skip ``circuit_open``; half-open -> a probe step (the executor claims the one
  probe, and skips the step when another call holds it);
* unhealthy -> skip ``unhealthy``, but appended after every planned provider as a last resort:
  a failed health probe never removes the last fallback.

When nothing is left to plan, every provider skipped for its state (circuit, health, cold) is
tried anyway rather than failing without asking; a model no provider serves is never tried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.routing.health import CircuitState, HealthState, Warmth

_DATED = re.compile(r".+-\d{8}")


@dataclass(frozen=True, slots=True)
class SlotView:
    """What the planner knows of one provider at planning time.

    Attributes:
        name: The provider's chain name.
        circuit: Its breaker's state.
        health: Its last health verdict.
        warmth: Cold-start state (``NOT_APPLICABLE`` unless it scales to zero).
        reachable: The last probe got an answer from a server (a cold scale-to-zero provider does not).
        started: Its start-up succeeded.
        serves_model: Whether it serves the requested model: True, False, or None when unknown.
        takes_images: It accepts the request as far as images go (False: it cannot read the
            request's images).
        allowed: The caller's tenant policy lets its calls reach this provider.
        budget_ok: The provider's monthly budget is not exhausted.
    """

    name: str
    circuit: CircuitState = CircuitState.CLOSED
    health: HealthState = HealthState.HEALTHY
    warmth: Warmth = Warmth.NOT_APPLICABLE
    reachable: bool = True
    started: bool = True
    serves_model: bool | None = True
    takes_images: bool = True
    allowed: bool = True
    budget_ok: bool = True


@dataclass(frozen=True, slots=True)
class Step:
    """One provider to try.

    Attributes:
        index: Position of the provider in the chain.
        wait_cold: The provider is cold and the call waits for its start.
        probe: Its circuit is half-open: the call must claim the probe first.
        last_resort: Planned only because it was skipped and everything before it may fail.
    """

    index: int
    wait_cold: bool = False
    probe: bool = False
    last_resort: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """The providers to try in order, the skipped ones with reasons, the ones to wake."""

    steps: tuple[Step, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    wake: tuple[int, ...] = ()

    @property
    def model_unserved(self) -> bool:
        """Every provider is known not to serve the requested model."""
        return not self.steps and bool(self.skipped) and all(r == "model_not_served" for _, r in self.skipped)

    @property
    def over_budget(self) -> bool:
        """Nothing to try because the providers that could serve the call spent their budgets."""
        reasons = {r for _, r in self.skipped}
        return (
            not self.steps
            and "budget_exhausted" in reasons
            and reasons
            <= {
                "budget_exhausted",
                "model_not_served",
                "not_allowed",
                "no_image_input",
            }
        )

    @property
    def images_unreadable(self) -> bool:
        """Nothing to try because the providers that could serve the call read no images."""
        reasons = {r for _, r in self.skipped}
        return (
            not self.steps
            and "no_image_input" in reasons
            and reasons
            <= {
                "no_image_input",
                "model_not_served",
                "not_allowed",
            }
        )

    @property
    def denied(self) -> bool:
        """Nothing to try, and the tenant's policy is why: the providers that could serve the
        call are ones its calls may not reach."""
        reasons = {r for _, r in self.skipped}
        return not self.steps and "not_allowed" in reasons and reasons <= {"not_allowed", "model_not_served"}


def _cold(view: SlotView) -> bool:
    # Unhealthy but never answered: a scale-to-zero provider that is asleep, not broken.
    asleep = view.health is not HealthState.UNHEALTHY or not view.reachable
    return view.warmth in (Warmth.COLD, Warmth.WARMING) and asleep


def plan(views: list[SlotView], policy: str) -> Plan:
    """Plans one call over ``views`` (chain order) under cold-start ``policy`` (``fallback``/``wait``)."""
    candidates = [
        v for v in views if v.allowed and v.budget_ok and v.started and v.serves_model is not False and v.takes_images
    ]
    steps: list[Step] = []
    skipped: list[tuple[str, str]] = []
    wake: list[int] = []
    tail: list[Step] = []  # unhealthy providers, tried after every planned one
    held: list[Step] = []  # circuit open or cold: tried only when nothing else is planned
    for i, view in enumerate(views):
        reason = ""
        if not view.allowed:
            reason = "not_allowed"
        elif not view.started:
            reason = "not_started"
        elif view.serves_model is False:
            reason = "model_not_served"
        elif not view.takes_images:
            reason = "no_image_input"
        elif not view.budget_ok:
            reason = "budget_exhausted"
        elif _cold(view):
            if policy == "wait" or len(candidates) == 1:
                steps.append(Step(i, wait_cold=True))
                continue
            reason = "cold" if view.warmth is Warmth.COLD else "warming"
            wake.append(i)
            held.append(Step(i, wait_cold=True, last_resort=True))
        elif view.circuit is CircuitState.HALF_OPEN:
            steps.append(Step(i, probe=True))
            continue
        elif view.circuit is CircuitState.OPEN:
            reason = "circuit_open"
            held.append(Step(i, last_resort=True))
        elif view.health is HealthState.UNHEALTHY:
            reason = "unhealthy"
            tail.append(Step(i, last_resort=True))
        if reason:
            skipped.append((view.name, reason))
            continue
        steps.append(Step(i))
    if not steps and not tail:
        tail = sorted(held, key=lambda s: s.index)
    return Plan(tuple(steps + tail), tuple(skipped), tuple(wake))


def serves(model: str | None, default_model: str, served: list[str]) -> bool | None:
    """Whether a provider serves ``model``, by its default and its own model list (None: unknown).

    A served id that is the name plus a date counts: Anthropic lists dated ids
    (``claude-sonnet-4-5-20250929``) and accepts their aliases (``claude-sonnet-4-5``).
    """
    if not model or model == default_model:
        return True
    if not served:
        return None
    return model in served or any(_DATED.fullmatch(s) and s[:-9] == model for s in served)
