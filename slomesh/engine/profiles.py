"""GPU performance profiles and a roofline step-time model for one 8B-class LLM.

The engine model (``slomesh.engine.model``) asks one question of this module: *how long does one
engine step take* on a given GPU, given how many uncached prefill tokens and how many decode
sequences the step carries and how much KV context they attend to. The answer is a roofline:
a step is bound either by tensor-core compute or by HBM/GDDR bandwidth, whichever is slower,
plus a fixed per-step overhead for the CPU scheduler, sampling and kernel launches.

Source: roofline models of LLM inference steps as used by SLOs-Serve (Chen et al., 2025,
arXiv:2504.08784), Vidur (Agrawal et al., MLSys 2024, arXiv:2405.05465) and LLMCompass
(Zhang et al., ISCA 2024); "LLM Inference Unveiled: Survey and Roofline Model Insights"
(Yuan et al., 2024, arXiv:2402.16363).

The efficiency factors and per-step overheads are calibration constants chosen so that the model
lands on published vLLM measurements for Llama-3.1-8B in bf16: about 7 ms per decode step at
batch 1 on an H100 SXM, about 60 ms on an L4, and about a third of a second to prefill 8k tokens
on an H100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

GIB = 1024**3
"""Bytes in one GiB."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer, enough to size its weights and KV cache.

    Source: Hugging Face config of meta-llama/Llama-3.1-8B-Instruct
    (https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json):
    32 layers, hidden size 4096, 32 attention heads, 8 KV heads (GQA), head dim 128,
    vocab 128256, bf16 weights; 8.03e9 parameters (model card).

    Attributes:
        name: Model name as served (Hugging Face id).
        num_params: Parameter count.
        num_layers: Transformer layers.
        hidden_size: Model (residual stream) width.
        num_attention_heads: Query heads per layer.
        num_kv_heads: Key/value heads per layer (grouped-query attention).
        head_dim: Width of one attention head.
        dtype_bytes: Bytes per weight and per KV element (2 for bf16).
        vocab_size: Tokenizer vocabulary size.
        max_model_len: Default context length served, in tokens (prompt plus output).
    """

    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    vocab_size: int = 128256
    max_model_len: int = 32768

    def __post_init__(self) -> None:
        for field_name in (
            "num_params",
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "dtype_bytes",
            "vocab_size",
            "max_model_len",
        ):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"ModelSpec.{field_name} must be > 0")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies across all layers (K and V).

        ``2 * num_layers * num_kv_heads * head_dim * dtype_bytes`` = 131072 for Llama-3.1-8B.
        """
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of model weights in GPU memory (``num_params * dtype_bytes``)."""
        return int(self.num_params * self.dtype_bytes)


LLAMA_3_1_8B_INSTRUCT = ModelSpec(
    name="meta-llama/Llama-3.1-8B-Instruct",
    num_params=8.03e9,
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_heads=8,
    head_dim=128,
    dtype_bytes=2,
    vocab_size=128256,
    max_model_len=32768,
)

QWEN_2_5_7B_INSTRUCT = ModelSpec(
    name="Qwen/Qwen2.5-7B-Instruct",
    num_params=7.61e9,
    num_layers=28,
    hidden_size=3584,
    num_attention_heads=28,
    num_kv_heads=4,
    head_dim=128,
    dtype_bytes=2,
    vocab_size=152064,
    max_model_len=32768,
)
"""Qwen2.5-7B-Instruct in bf16.

Source: Hugging Face config of Qwen/Qwen2.5-7B-Instruct
(https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json): 28 layers, hidden size
3584, 28 attention heads, 4 KV heads (GQA), head dim 3584 / 28 = 128, vocab 152064, bf16;
7.61e9 parameters and a 32,768-token context without YaRN (model card).
"""

DEFAULT_MODEL = LLAMA_3_1_8B_INSTRUCT
"""The model every slomesh instance serves unless told otherwise."""

MODELS: dict[str, ModelSpec] = {m.name: m for m in (LLAMA_3_1_8B_INSTRUCT, QWEN_2_5_7B_INSTRUCT)}
"""Known model shapes by served name."""


def get_model_spec(name: str) -> ModelSpec:
    """Return the known model shape named ``name``.

    Raises:
        ValueError: ``name`` is not in ``MODELS`` (maps to INVALID_ARGUMENT).
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None


def model_load_time_s(
    weights_bytes: int,
    *,
    load_gb_per_s: float,
    overhead_s: float,
) -> float:
    """Time for an engine to switch to a model: its weights into GPU memory, then warm-up.

    ::

        load_s = overhead_s + weights_bytes / (load_gb_per_s * 1e9)

    ``load_gb_per_s`` is the bandwidth the weights arrive at: the region's local weight cache
    (NVMe/disk to GPU) when it holds the model, else the remote store (object store or another
    region) -- `slomesh.topology.RegionSpec.weight_cache_gb_per_s` /
    ``remote_weights_gb_per_s``. ``overhead_s`` is what a vLLM engine start costs besides
    reading weights (process and CUDA init, ``torch.compile``, CUDA-graph capture, KV-cache
    profiling and warm-up); `slomesh.topology.RegionSpec.model_load_overhead_s`. This is
    ``M_q`` of DESIGN.md section 2 for a placement that loads the request's model first.

    Source: the phases of a vLLM cold start (weights download, weights to GPU, torch.compile,
    graph capture, engine init) as broken down in "Reducing GPU Cold Start Time when using
    vLLM" (Tensorfuse, 2025, https://tensorfuse.io/docs/blogs/reducing_gpu_cold_start) and
    "Breaking the Ice: Analyzing Cold Start Latency in vLLM" (arXiv:2606.07362): the weight
    phase scales with bytes over the storage or network bandwidth, the rest is a per-engine
    constant for a given model size and GPU.

    Args:
        weights_bytes: Bytes of weights to load (>= 0); `ModelSpec.weight_bytes` by default.
        load_gb_per_s: Bandwidth of the weights' source, GB/s (1 GB = 1e9 bytes; > 0).
        overhead_s: Engine start-up time besides the weights, seconds (>= 0).

    Returns:
        Seconds.

    Raises:
        ValueError: a negative size or overhead, or a bandwidth that is not > 0 (names it).
    """
    if weights_bytes < 0:
        raise ValueError(f"weights_bytes: must be >= 0, got {weights_bytes}")
    if not (load_gb_per_s > 0 and math.isfinite(load_gb_per_s)):
        raise ValueError(f"load_gb_per_s: must be finite and > 0, got {load_gb_per_s}")
    if not (overhead_s >= 0 and math.isfinite(overhead_s)):
        raise ValueError(f"overhead_s: must be finite and >= 0, got {overhead_s}")
    return overhead_s + weights_bytes / (load_gb_per_s * 1e9)


def switched_max_model_len(
    profile: GpuProfile | None, model: ModelSpec | None, limit: int, block_size: int = 16
) -> int:
    """Context an engine serves after switching to ``model``: ``limit`` (the model's
    ``max_model_len`` in the topology) capped at what the GPU's KV cache holds of the model.

    vLLM refuses to start when one ``max_model_len`` sequence does not fit the KV cache; an
    instance switched to another model at run time is started with the largest context that
    fits. With an unknown GPU or model the limit stands.

    Args:
        profile: GPU of the instance, or None when it has no profile (e.g. "CPU").
        model: The model switched to, or None when the engine model does not know it.
        limit: The model's context limit, tokens (>= 1).
        block_size: Tokens per KV block.

    Returns:
        Tokens; 0 when the model leaves no KV-cache memory on the GPU (it cannot be served).
    """
    if profile is None or model is None:
        return limit
    return min(limit, profile.num_gpu_blocks(model, block_size) * block_size)


ACTIVATION_RESERVE_BYTES = 1 * GIB
"""GPU memory held back from the KV cache for activations, CUDA graphs and the allocator."""


@dataclass(frozen=True)
class GpuProfile:
    """Performance and memory of one GPU type, for the roofline step-time model.

    Attributes:
        gpu_type: Short name ("H100", "A100", "L40S", "A10G", "L4").
        peak_flops: Dense BF16 tensor-core throughput, FLOP/s (no sparsity).
        mem_bandwidth_bytes_per_s: Peak device-memory bandwidth, bytes/s.
        mem_bytes: Device memory, bytes.
        compute_efficiency: Fraction of ``peak_flops`` a large prefill achieves (MFU).
        memory_efficiency: Fraction of ``mem_bandwidth_bytes_per_s`` a decode step achieves.
        step_overhead_s: Fixed per-step cost (scheduler, sampling, kernel launches), seconds.
        gpu_memory_utilization: Fraction of ``mem_bytes`` vLLM may use
            (vLLM's ``--gpu-memory-utilization``, default 0.9).
    """

    gpu_type: str
    peak_flops: float
    mem_bandwidth_bytes_per_s: float
    mem_bytes: int
    compute_efficiency: float
    memory_efficiency: float
    step_overhead_s: float
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        for field_name in ("peak_flops", "mem_bandwidth_bytes_per_s", "mem_bytes"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"GpuProfile.{field_name} must be > 0")
        for field_name in ("compute_efficiency", "memory_efficiency", "gpu_memory_utilization"):
            value = getattr(self, field_name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"GpuProfile.{field_name} must be in (0, 1], got {value}")
        if self.step_overhead_s < 0:
            raise ValueError("GpuProfile.step_overhead_s must be >= 0")

    def kv_cache_bytes(self, model: ModelSpec) -> int:
        """Bytes left for the KV cache once weights and the activation reserve are placed.

        ``mem_bytes * gpu_memory_utilization - weight_bytes - ACTIVATION_RESERVE_BYTES``,
        floored at 0.

        Source: vLLM's KV-cache sizing (``determine_available_memory``): the usable share of
        device memory minus the weights and the peak activation memory of a profiling run.
        """
        usable = self.mem_bytes * self.gpu_memory_utilization
        return max(0, int(usable - model.weight_bytes - ACTIVATION_RESERVE_BYTES))

    def num_gpu_blocks(self, model: ModelSpec, block_size: int = 16) -> int:
        """Number of KV blocks of ``block_size`` tokens that fit in this GPU's KV-cache memory.

        ``floor(kv_cache_bytes / (block_size * kv_bytes_per_token))``. An 8B bf16 model (16 GB of
        weights) still fits a 24 GiB card, with room for about 46k tokens of KV.

        Raises:
            ValueError: ``block_size`` < 1.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return self.kv_cache_bytes(model) // (block_size * model.kv_bytes_per_token)


# Datasheet sources (dense BF16 tensor throughput; memory and bandwidth):
#   H100 SXM5 80GB: 989 TFLOPS, 3.35 TB/s - https://www.nvidia.com/en-us/data-center/h100/
#   A100 40GB SXM: 312 TFLOPS, 1,555 GB/s - https://www.nvidia.com/en-us/data-center/a100/
#   L40S 48GB: 362 TFLOPS, 864 GB/s - https://www.nvidia.com/en-us/data-center/l40s/
#   A10G 24GB (AWS G5): ~70 TFLOPS, 600 GB/s -
#       https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/
#       (the A10 is 125 TFLOPS; AWS's A10G variant trades tensor throughput for CUDA cores)
#   L4 24GB: 121 TFLOPS, 300 GB/s - https://www.nvidia.com/en-us/data-center/l4/
# Efficiencies and overheads are calibration constants (module docstring).
PROFILES: dict[str, GpuProfile] = {
    "H100": GpuProfile(
        gpu_type="H100",
        peak_flops=989e12,
        mem_bandwidth_bytes_per_s=3.35e12,
        mem_bytes=80 * GIB,
        compute_efficiency=0.45,
        memory_efficiency=0.80,
        step_overhead_s=0.001,
    ),
    "A100": GpuProfile(
        gpu_type="A100",
        peak_flops=312e12,
        mem_bandwidth_bytes_per_s=1.555e12,
        mem_bytes=40 * GIB,
        compute_efficiency=0.55,
        memory_efficiency=0.80,
        step_overhead_s=0.0015,
    ),
    "L40S": GpuProfile(
        gpu_type="L40S",
        peak_flops=362e12,
        mem_bandwidth_bytes_per_s=0.864e12,
        mem_bytes=48 * GIB,
        compute_efficiency=0.50,
        memory_efficiency=0.85,
        step_overhead_s=0.0015,
    ),
    "A10G": GpuProfile(
        gpu_type="A10G",
        peak_flops=70e12,
        mem_bandwidth_bytes_per_s=0.6e12,
        mem_bytes=24 * GIB,
        compute_efficiency=0.60,
        memory_efficiency=0.85,
        step_overhead_s=0.002,
    ),
    "L4": GpuProfile(
        gpu_type="L4",
        peak_flops=121e12,
        mem_bandwidth_bytes_per_s=0.3e12,
        mem_bytes=24 * GIB,
        compute_efficiency=0.50,
        memory_efficiency=0.88,
        step_overhead_s=0.0015,
    ),
}
"""GPU profiles by ``gpu_type``."""


def get_profile(gpu_type: str) -> GpuProfile:
    """Return the profile of ``gpu_type`` (case-sensitive: "H100", "A100", "L40S", "A10G", "L4").

    Raises:
        ValueError: the GPU type is unknown (maps to INVALID_ARGUMENT).
    """
    try:
        return PROFILES[gpu_type]
    except KeyError:
        raise ValueError(
            f"unknown gpu_type {gpu_type!r}; known GPU types: {sorted(PROFILES)}"
        ) from None


def step_time_s(
    profile: GpuProfile,
    model: ModelSpec,
    prefill_tokens: int,
    decode_seqs: int,
    total_context_tokens: int,
    *,
    attention_pairs: float | None = None,
) -> float:
    """Duration of one engine step (one forward pass of the whole batch), in seconds.

    Roofline::

        flops   = 2 * num_params * (prefill_tokens + decode_seqs)          # GEMMs
                + 4 * num_layers * hidden_size * attention_pairs           # QK^T and AV
        bytes   = weight_bytes                                             # read once per step
                + kv_bytes_per_token * total_context_tokens                # KV read by attention
                + kv_bytes_per_token * (prefill_tokens + decode_seqs)      # KV written
        compute = flops / (peak_flops * compute_efficiency)
        memory  = bytes / (mem_bandwidth_bytes_per_s * memory_efficiency)
        step    = max(compute, memory) + step_overhead_s

    Source: SLOs-Serve (arXiv:2504.08784) section 4 and Vidur (arXiv:2405.05465) model a batch's
    forward time from its prefill tokens, decode count and context; the 2·N FLOPs per token and
    4·L·d FLOPs per attended (query, key) pair are from Kaplan et al. 2020 (arXiv:2001.08361),
    table 1.

    Args:
        profile: GPU the step runs on.
        model: Model being served.
        prefill_tokens: Uncached prompt tokens computed in this step (all sequences).
        decode_seqs: Sequences that decode one token in this step.
        total_context_tokens: Sum over the step's sequences of the KV length each attends to
            (tokens already in the cache plus those computed this step).
        attention_pairs: Number of (query token, key token) pairs attention evaluates, causal
            mask applied. ``None`` estimates it as ``total_context_tokens +
            prefill_tokens**2 / 2`` (one query per decode sequence over its context, plus a
            fresh causal prefill); the engine passes the exact count.

    Returns:
        Step duration in seconds; 0.0 for an empty step.

    Raises:
        ValueError: a count is negative.
    """
    if prefill_tokens < 0 or decode_seqs < 0 or total_context_tokens < 0:
        raise ValueError(
            "prefill_tokens, decode_seqs and total_context_tokens must be >= 0, got "
            f"{prefill_tokens}, {decode_seqs}, {total_context_tokens}"
        )
    new_tokens = prefill_tokens + decode_seqs
    if new_tokens == 0:
        return 0.0
    if attention_pairs is None:
        attention_pairs = total_context_tokens + prefill_tokens * prefill_tokens / 2.0
    elif attention_pairs < 0:
        raise ValueError(f"attention_pairs must be >= 0, got {attention_pairs}")
    return roofline(profile, model).step_s(
        new_tokens, total_context_tokens, attention_pairs
    )


class Roofline(NamedTuple):
    """`step_time_s`'s roofline for one (GPU, model), its constants divided out once.

    Attributes:
        s_per_new_token: ``2 * num_params / (peak_flops * compute_efficiency)``, s.
        s_per_attention_pair: ``4 * num_layers * hidden_size / (peak_flops *
            compute_efficiency)``, s.
        weights_s: ``weight_bytes / (mem_bandwidth_bytes_per_s * memory_efficiency)``, s.
        s_per_kv_token: ``kv_bytes_per_token / (mem_bandwidth_bytes_per_s *
            memory_efficiency)``, s.
        overhead_s: ``step_overhead_s``, s.
    """

    s_per_new_token: float
    s_per_attention_pair: float
    weights_s: float
    s_per_kv_token: float
    overhead_s: float

    def step_s(
        self, new_tokens: int, total_context_tokens: float, attention_pairs: float
    ) -> float:
        """`step_time_s` of a step of ``new_tokens`` > 0 (prefill tokens + decode
        sequences), unchecked: the hot path of the predictor and the engine."""
        compute_s = (
            self.s_per_new_token * new_tokens + self.s_per_attention_pair * attention_pairs
        )
        memory_s = self.weights_s + self.s_per_kv_token * (total_context_tokens + new_tokens)
        return max(compute_s, memory_s) + self.overhead_s


_ROOFLINES: dict[tuple[int, int], tuple[GpuProfile, ModelSpec, Roofline]] = {}


def roofline(profile: GpuProfile, model: ModelSpec) -> Roofline:
    """The `Roofline` of ``profile`` serving ``model``, computed once per pair of objects."""
    key = (id(profile), id(model))
    got = _ROOFLINES.get(key)
    if got is None or got[0] is not profile or got[1] is not model:
        compute = profile.peak_flops * profile.compute_efficiency
        memory = profile.mem_bandwidth_bytes_per_s * profile.memory_efficiency
        line = Roofline(
            s_per_new_token=2.0 * model.num_params / compute,
            s_per_attention_pair=4.0 * model.num_layers * model.hidden_size / compute,
            weights_s=model.weight_bytes / memory,
            s_per_kv_token=model.kv_bytes_per_token / memory,
            overhead_s=profile.step_overhead_s,
        )
        if len(_ROOFLINES) >= 1024:  # profiles built on the fly (tests, fits): stay bounded
            _ROOFLINES.clear()
        got = _ROOFLINES[key] = (profile, model, line)
    return got[2]


def decode_step_time_s(
    profile: GpuProfile, model: ModelSpec, batch_size: int, mean_context_tokens: float
) -> float:
    """Decode-only step time (TPOT) at ``batch_size`` sequences of ``mean_context_tokens`` each.

    A convenience over :func:`step_time_s` for placement and SLO checks (DESIGN.md §2, ``D_q``).

    Raises:
        ValueError: ``batch_size`` < 1 or ``mean_context_tokens`` < 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mean_context_tokens < 0:
        raise ValueError(f"mean_context_tokens must be >= 0, got {mean_context_tokens}")
    total_context = math.ceil(batch_size * mean_context_tokens)
    return step_time_s(
        profile, model, 0, batch_size, total_context, attention_pairs=float(total_context)
    )


def prefill_time_s(
    profile: GpuProfile, model: ModelSpec, uncached_tokens: int, cached_tokens: int = 0
) -> float:
    """Time to prefill ``uncached_tokens`` after a cached prefix of ``cached_tokens``, alone.

    One step holding the whole uncached part (no chunking, no co-scheduled decodes); DESIGN.md
    §2, ``P_q``.

    Raises:
        ValueError: a count is negative.
    """
    if uncached_tokens < 0 or cached_tokens < 0:
        raise ValueError("uncached_tokens and cached_tokens must be >= 0")
    n = uncached_tokens
    pairs = n * cached_tokens + n * (n + 1) / 2.0
    return step_time_s(profile, model, n, 0, cached_tokens + n, attention_pairs=pairs)
