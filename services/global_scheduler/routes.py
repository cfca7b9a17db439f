"""Agent addresses as reached from each origin region (``--routes-json``).

The file is a JSON object ``{"<origin region>": {"<serving region>": "host:port"}}``. In the
local mesh the routes point at WAN relay ports that add half the RTT each way, so a client (or
the scheduler acting for it) in the origin region sees the WAN. A missing route means: use the
agent's own address from its `RegionState.agent_endpoint`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Routes", "RoutesError", "load_routes"]

_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")


class RoutesError(ValueError):
    """The routes file is missing or malformed; the message names the offending entry."""


class Routes:
    """Origin -> serving region -> agent address.

    Args:
        table: ``{origin: {serving region: "host:port"}}``.

    Raises:
        RoutesError: an entry is not a mapping of region names to ``host:port``.
    """

    def __init__(self, table: Mapping[str, Mapping[str, str]] | None = None):
        self._table: dict[str, dict[str, str]] = {}
        for origin, row in (table or {}).items():
            if not isinstance(origin, str) or not isinstance(row, Mapping):
                raise RoutesError(f"routes.{origin}: must map serving regions to host:port")
            clean: dict[str, str] = {}
            for region, endpoint in row.items():
                if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
                    raise RoutesError(
                        f"routes.{origin}.{region}: {endpoint!r} is not a host:port address"
                    )
                clean[str(region)] = endpoint
            self._table[origin] = clean

    def resolve(self, origin: str, region: str, fallback: str) -> str:
        """The agent address of `region` as reached from `origin`, else `fallback`."""
        return self._table.get(origin, {}).get(region) or fallback

    def as_dict(self) -> dict[str, dict[str, str]]:
        """A copy of the table."""
        return {o: dict(row) for o, row in self._table.items()}


def load_routes(path: str | Path | None) -> Routes:
    """Reads a routes JSON file (``None`` = no routes).

    Raises:
        RoutesError: unreadable file, invalid JSON, or a malformed entry.
    """
    if path is None:
        return Routes()
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise RoutesError(f"routes: cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise RoutesError(f"routes: {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RoutesError(f"routes: {path} must hold a JSON object")
    return Routes(data)
