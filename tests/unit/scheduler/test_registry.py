"""Plugin registries: duplicates and unknown names raise; built-ins are all registered."""

from __future__ import annotations

import pytest

from slomesh.scheduler import policy  # noqa: F401 - registers the built-ins
from slomesh.scheduler.registry import (
    FILTERS,
    PICKERS,
    PROFILES,
    SCORERS,
    DuplicateNameError,
    Registry,
    UnknownNameError,
)


class Thing:
    def __init__(self, size: int = 1):
        self.size = size


def test_register_and_make_with_params():
    reg: Registry[Thing] = Registry("thing")
    reg.register("t")(Thing)
    assert "t" in reg and len(reg) == 1
    assert reg.make("t", size=3).size == 3


def test_duplicate_registration_raises_and_keeps_the_first():
    reg: Registry[Thing] = Registry("thing")
    reg.add("t", Thing)

    class Other(Thing):
        pass

    with pytest.raises(DuplicateNameError, match="thing 't' is already registered"):
        reg.register("t")(Other)
    assert type(reg.make("t")) is Thing


def test_unknown_name_raises_listing_known_names():
    reg: Registry[Thing] = Registry("thing")
    reg.add("b", Thing)
    reg.add("a", Thing)
    with pytest.raises(UnknownNameError) as info:
        reg.make("c")
    assert str(info.value) == "unknown thing 'c' (known: a, b)"
    assert isinstance(info.value, KeyError)


def test_empty_name_rejected():
    with pytest.raises(ValueError):
        Registry("thing").add("", Thing)


def test_factory_errors_propagate():
    reg: Registry[Thing] = Registry("thing")
    reg.add("t", Thing)
    with pytest.raises(TypeError):
        reg.make("t", colour="red")


def test_builtins_are_registered():
    assert FILTERS.names() == [
        "fresh",
        "healthy",
        "kv-room",
        "nearest-region",
        "protect-inflight",
        "region-allowlist",
        "serves-model",
        "slo-feasible",
    ]
    assert SCORERS.names() == [
        "kv-cache-utilization",
        "kv-overlap-cost",
        "least-outstanding",
        "lowest-queue-wait",
        "lowest-ttft",
        "objective",
        "prefix-cache-hit",
        "queue-depth",
    ]
    assert PICKERS.names() == ["max-score", "round-robin", "softmax-sample"]
    assert PROFILES.names() == [
        "dynamo",
        "least-load",
        "llm-d",
        "nearest",
        "oracle",
        "qlm",
        "round-robin",
        "slomesh",
    ]
    with pytest.raises(DuplicateNameError):
        FILTERS.add("healthy", Thing)
