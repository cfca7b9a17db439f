"""Plain helpers shared by tests (factories, ports)."""

from __future__ import annotations

from slomesh.procs import free_port, wait_for_port

__all__ = ["free_port", "wait_for_port"]
