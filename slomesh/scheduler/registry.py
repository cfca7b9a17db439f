"""Name -> factory registries for placement plugins and policy profiles.

A `Registry` maps a name to a factory. Registering a name twice raises (no silent overwrite);
making an unknown name raises `UnknownNameError` listing the known ones. The built-in filters,
scorers, pickers and profiles are all registered in one place, at the bottom of
`slomesh.scheduler.policy`.

Example::

    from slomesh.scheduler.registry import SCORERS

    @SCORERS.register("my-scorer")
    class MyScorer(Scorer):
        ...

    scorer = SCORERS.make("my-scorer", some_param=1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = [
    "FILTERS",
    "PICKERS",
    "PROFILES",
    "SCORERS",
    "DuplicateNameError",
    "Registry",
    "UnknownNameError",
]

T = TypeVar("T")


class DuplicateNameError(ValueError):
    """A name is registered twice in one registry."""


class UnknownNameError(KeyError):
    """`Registry.make` was asked for a name nobody registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A registry of factories of one kind of plugin.

    Args:
        kind: What the registry holds ("filter", "scorer", ...), for error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a factory (usually a class) under `name`.

        Raises:
            DuplicateNameError: `name` is already registered.
            ValueError: `name` is empty.
        """

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory)
            return factory

        return decorator

    def add(self, name: str, factory: Callable[..., T]) -> None:
        """Registers `factory` under `name` (the non-decorator form of `register`).

        Raises:
            DuplicateNameError: `name` is already registered.
            ValueError: `name` is empty.
        """
        if not name:
            raise ValueError(f"{self.kind} name must not be empty")
        if name in self._factories:
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory

    def make(self, name: str, **params: Any) -> T:
        """Builds the plugin registered under `name` with keyword `params`.

        Raises:
            UnknownNameError: nothing is registered under `name`.
            TypeError / ValueError: the factory rejects `params`.
        """
        try:
            factory = self._factories[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})"
            ) from None
        return factory(**params)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __len__(self) -> int:
        return len(self._factories)


#: Candidate filters (`slomesh.scheduler.policy.Filter`).
FILTERS: Registry[Any] = Registry("filter")
#: Candidate scorers (`slomesh.scheduler.policy.Scorer`).
SCORERS: Registry[Any] = Registry("scorer")
#: Pickers (`slomesh.scheduler.policy.Picker`).
PICKERS: Registry[Any] = Registry("picker")
#: Policy profiles by name: factories returning a profile mapping (see `PolicyProfile`).
PROFILES: Registry[Any] = Registry("policy")
