"""The vLLM engine model shared by the emulator (wall clock) and the simulator (virtual time):
GPU roofline profiles, a paged KV cache with prefix caching, and a continuous-batching scheduler.
"""

from slomesh.engine.kv_cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    KVEvent,
    compute_block_hashes,
    hash_block,
)
from slomesh.engine.model import (
    Engine,
    EngineConfig,
    EngineRequest,
    EngineStats,
    FirstScheduled,
    RequestMetrics,
    StepResult,
    TokenOutput,
)
from slomesh.engine.profiles import (
    DEFAULT_MODEL,
    MODELS,
    PROFILES,
    GpuProfile,
    ModelSpec,
    get_model_spec,
    get_profile,
    step_time_s,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "PROFILES",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineStats",
    "FirstScheduled",
    "GpuProfile",
    "KVCacheManager",
    "KVEvent",
    "ModelSpec",
    "RequestMetrics",
    "StepResult",
    "TokenOutput",
    "compute_block_hashes",
    "get_model_spec",
    "get_profile",
    "hash_block",
    "step_time_s",
]
