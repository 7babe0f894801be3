"""The planner as a table: provider states in, plan out, without I/O."""

from __future__ import annotations

import pytest

from service.routing.health import CircuitState as C
from service.routing.health import HealthState as H
from service.routing.health import Warmth as W
from service.routing.planner import SlotView, Step, plan, serves


def v(name: str, **kw: object) -> SlotView:
    return SlotView(name, **kw)  # type: ignore[arg-type]


# (case, views, policy, expected steps as (name, flags), expected skips, expected wake-ups)
# fmt: off
CASES = [
    (
        "all healthy: chain order",
        [v("modal"), v("vastai"), v("anthropic")],
        "fallback",
        [("modal", ""), ("vastai", ""), ("anthropic", "")],
        [],
        [],
    ),
    (
        "cold modal under fallback: skipped and woken",
        [v("modal", warmth=W.COLD), v("vastai")],
        "fallback",
        [("vastai", "")],
        [("modal", "cold")],
        ["modal"],
    ),
    (
        "cold modal under wait: waited for",
        [v("modal", warmth=W.COLD), v("vastai")],
        "wait",
        [("modal", "wait_cold"), ("vastai", "")],
        [],
        [],
    ),
    ("cold modal alone: waited for", [v("modal", warmth=W.COLD)], "fallback", [("modal", "wait_cold")], [], []),
    (
        "warming modal: skipped, woken (the monitor dedupes)",
        [v("modal", warmth=W.WARMING), v("vastai")],
        "fallback",
        [("vastai", "")],
        [("modal", "warming")],
        ["modal"],
    ),
    (
        "half-open never overrides cold-start routing",
        [v("modal", warmth=W.COLD, circuit=C.HALF_OPEN), v("vastai")],
        "fallback",
        [("vastai", "")],
        [("modal", "cold")],
        ["modal"],
    ),
    (
        "half-open warm: a probe step",
        [v("modal", circuit=C.HALF_OPEN, warmth=W.WARM), v("vastai")],
        "fallback",
        [("modal", "probe"), ("vastai", "")],
        [],
        [],
    ),
    (
        "open circuit: skipped",
        [v("modal", circuit=C.OPEN), v("vastai")],
        "fallback",
        [("vastai", "")],
        [("modal", "circuit_open")],
        [],
    ),
    (
        "unhealthy stays the last fallback",
        [v("modal"), v("vastai", health=H.UNHEALTHY), v("anthropic")],
        "fallback",
        [("modal", ""), ("anthropic", ""), ("vastai", "last_resort")],
        [("vastai", "unhealthy")],
        [],
    ),
    (
        "cold and never answered is asleep, not broken",
        [v("modal", warmth=W.COLD, health=H.UNHEALTHY, reachable=False), v("vastai")],
        "fallback",
        [("vastai", "")],
        [("modal", "cold")],
        ["modal"],
    ),
    (
        "warm and unhealthy is broken",
        [v("modal", warmth=W.WARM, health=H.UNHEALTHY), v("vastai")],
        "fallback",
        [("vastai", ""), ("modal", "last_resort")],
        [("modal", "unhealthy")],
        [],
    ),
    (
        "everything held back: tried anyway",
        [v("modal", circuit=C.OPEN), v("vastai", circuit=C.OPEN)],
        "fallback",
        [("modal", "last_resort"), ("vastai", "last_resort")],
        [("modal", "circuit_open"), ("vastai", "circuit_open")],
        [],
    ),
    (
        "model not served: never tried",
        [v("modal", serves_model=False), v("anthropic")],
        "fallback",
        [("anthropic", "")],
        [("modal", "model_not_served")],
        [],
    ),
    (
        "model unknown: tried",
        [v("modal", serves_model=None), v("anthropic", serves_model=False)],
        "fallback",
        [("modal", "")],
        [("anthropic", "model_not_served")],
        [],
    ),
    (
        "not started: skipped, never a last resort",
        [v("modal", started=False), v("vastai", circuit=C.OPEN)],
        "fallback",
        [("vastai", "last_resort")],
        [("modal", "not_started"), ("vastai", "circuit_open")],
        [],
    ),
    (
        "cold modal with the only other provider not serving the model: waited for",
        [v("modal", warmth=W.COLD), v("anthropic", serves_model=False)],
        "fallback",
        [("modal", "wait_cold")],
        [("anthropic", "model_not_served")],
        [],
    ),
]
# fmt: on


def flags(step: Step) -> str:
    return next((f for f in ("wait_cold", "probe", "last_resort") if getattr(step, f)), "")


@pytest.mark.parametrize(("case", "views", "policy", "steps", "skipped", "wake"), CASES, ids=[c[0] for c in CASES])
def test_plan(
    case: str,
    views: list[SlotView],
    policy: str,
    steps: list[tuple[str, str]],
    skipped: list[tuple[str, str]],
    wake: list[str],
) -> None:
    result = plan(views, policy)
    assert [(views[s.index].name, flags(s)) for s in result.steps] == steps
    assert list(result.skipped) == skipped
    assert [views[i].name for i in result.wake] == wake


def test_a_policy_that_leaves_nothing_is_a_denial() -> None:
    result = plan([v("modal", serves_model=False), v("anthropic", allowed=False)], "fallback")
    assert result.denied and not result.model_unserved
    assert not plan([v("modal", allowed=False), v("anthropic")], "fallback").denied


def test_a_model_nobody_serves_is_known_before_any_call() -> None:
    result = plan([v("modal", serves_model=False), v("anthropic", serves_model=False)], "fallback")
    assert result.model_unserved and result.steps == ()
    assert not plan([v("modal", serves_model=None)], "fallback").model_unserved


@pytest.mark.parametrize(
    ("model", "default", "served", "expected"),
    [
        (None, "m", [], True),
        ("m", "m", ["x"], True),
        ("x", "m", ["x", "m"], True),
        ("y", "m", ["x", "m"], False),
        ("y", "m", [], None),
        ("claude-sonnet-4-5", "claude-haiku-4-5", ["claude-sonnet-4-5-20250929"], True),
        ("claude-sonnet-4", "claude-haiku-4-5", ["claude-sonnet-4-5-20250929"], False),
    ],
)
def test_serves(model: str | None, default: str, served: list[str], expected: bool | None) -> None:
    assert serves(model, default, served) is expected
