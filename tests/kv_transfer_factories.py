"""Factories for KV transfer tests: vLLM ExampleConnector folders and weight-cache models on disk.

The folders have vLLM 0.32's layout (one ``model.layers.N.self_attn.attn.safetensors`` per
layer, tensor ``kv_cache`` of shape ``[prefix tokens, kv heads, 2 * head dim]``, as a real
CPU vLLM wrote for the tiny Llama of ``configs/vllm/tiny-llama``), filled with seeded random
bytes so that every file differs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slomesh.transfer.stores import (
    SAFETENSORS_DTYPES,
    KvStoreConfig,
    example_connector_folder_name,
    example_connector_stored_tokens,
    write_safetensors_file,
)

MODEL = "tiny-llama"
BLOCK_SIZE = 16
NUM_LAYERS = 3
KV_HEADS = 2
HEAD_DIM = 32


def tokens(n: int, seed: int = 0) -> list[int]:
    """`n` token ids in [3, 32000), seeded."""
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


def kv_store_config(
    store_id: str, path: Path, *, block_size: int = BLOCK_SIZE, **overrides
) -> KvStoreConfig:
    """A vLLM ExampleConnector store config of the test model."""
    return KvStoreConfig(
        id=store_id,
        path=path,
        model=overrides.pop("model", MODEL),
        block_size=block_size,
        **overrides,
    )


def write_kv_folder(
    root: Path,
    prompt: Sequence[int],
    *,
    block_size: int = BLOCK_SIZE,
    num_layers: int = NUM_LAYERS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> tuple[str, int]:
    """Writes the folder vLLM's ExampleConnector stores for `prompt` under `root`.

    Returns:
        (folder name, prefix tokens stored).
    """
    n = example_connector_stored_tokens(len(prompt), block_size)
    name = example_connector_folder_name(list(prompt[:n]))
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    tag = SAFETENSORS_DTYPES[dtype]
    width = {"BF16": 2, "F16": 2, "F32": 4}.get(tag, 1)
    rng = np.random.default_rng(seed)
    shape = [n, kv_heads, 2 * head_dim]
    for layer in range(num_layers):
        data = rng.integers(0, 256, size=n * kv_heads * 2 * head_dim * width, dtype=np.uint8)
        write_safetensors_file(
            folder / f"model.layers.{layer}.self_attn.attn.safetensors",
            "kv_cache",
            tag,
            shape,
            data.tobytes(),
        )
    return name, n


def write_weight_model(
    root: Path,
    model: str,
    *,
    shard_bytes: Sequence[int] = (300_000, 200_000),
    torch_dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Writes a model into a weight cache: config.json, index, and safetensors shards of about
    the given sizes (U8 tensors of random bytes).

    Returns:
        The model's directory.
    """
    model_dir = root / model
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": torch_dtype})
    )
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, nbytes in enumerate(shard_bytes):
        name = f"model-{i + 1:05d}-of-{len(shard_bytes):05d}.safetensors"
        tensor = f"model.layers.{i}.mlp.weight"
        write_safetensors_file(
            model_dir / name,
            tensor,
            "U8",
            [nbytes],
            rng.integers(0, 256, size=nbytes, dtype=np.uint8).tobytes(),
        )
        weight_map[tensor] = name
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return model_dir


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every regular file under `directory` (hidden ones included)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
