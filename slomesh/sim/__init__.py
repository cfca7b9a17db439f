"""Discrete-event simulator of the multi-region mesh: the emulator's engine model, the live
scheduler's policy objects and the region agents' accounting, driven in virtual time.

See `slomesh.sim.simulator` for the model and `slomesh.sim.cli` for ``slomesh sim``.
"""

from slomesh.sim.simulator import EPOCH_UNIX_NS, SimConfig, SimOutcome, SimRecord, Simulator

__all__ = ["EPOCH_UNIX_NS", "SimConfig", "SimOutcome", "SimRecord", "Simulator"]
