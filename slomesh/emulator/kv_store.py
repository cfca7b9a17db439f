"""The emulator's external KV store: vLLM ExampleConnector's directory layout, emulated KV bytes.

With ``--kv-store-path DIR`` the emulator behaves like a vLLM started with
``--kv-transfer-config '{"kv_connector": "ExampleConnector", "kv_role": "kv_both",
"kv_connector_extra_config": {"shared_storage_path": DIR}}'``:

- a request that completes its prefill without having loaded anything saves its prompt's KV as
  ``DIR/<md5 of the stored prefix's tokens as int64>/model.layers.N.self_attn.attn.safetensors``
  (one file per layer, tensor ``kv_cache`` of shape ``[prefix tokens, width]``, bf16), the
  prefix being vLLM's whole blocks short of the prompt's last token
  (`slomesh.transfer.stores.example_connector_stored_tokens`);
- a new request whose prefix folder exists (`example_connector_lookup_tokens`) loads it instead
  of computing it, counted in ``vllm:prompt_tokens_by_source_total{source=
  "external_kv_transfer"}``.

The files have the size the real model's KV would take, ``kv_bytes_per_token / num_layers`` per
token per layer (`ModelSpec.kv_bytes_per_token`), times ``scale`` (< 1 shrinks them for local
runs: the tensor's width is scaled, never the token count, so the layout stays checkable). Their
bytes are not KV (the emulator has no model): the store's kind is "emulator", which the KV
transfer service never mixes with a real vLLM's store. Folders appear atomically (written under
``DIR/.partial/``, then renamed), so a reader never sees a partial folder.

Load and save times use the real model's KV bytes over a configured bandwidth: vLLM's
ExampleConnector loads with ``safetensors.torch.load_file`` (file -> host memory) and copies to
the GPU, synchronously in the forward pass, and saves the reverse way. The defaults,
`DEFAULT_LOAD_BYTES_PER_S` and `DEFAULT_SAVE_BYTES_PER_S`, are assumptions to be replaced by a
measurement of the deployment's storage (a page-cached file read and a pageable host-to-GPU copy
each run at several GB/s on current servers; PCIe 4.0 x16 peaks at ~32 GB/s).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from slomesh.engine.profiles import ModelSpec
from slomesh.transfer.staging import PARTIAL_DIR
from slomesh.transfer.stores import (
    example_connector_folder_name,
    example_connector_lookup_tokens,
    example_connector_stored_tokens,
    write_safetensors_file,
)

__all__ = ["DEFAULT_LOAD_BYTES_PER_S", "DEFAULT_SAVE_BYTES_PER_S", "EmulatorKvStore"]

DEFAULT_LOAD_BYTES_PER_S = 5e9
"""Assumed end-to-end load bandwidth of the file-based connector, bytes/s (module docstring)."""
DEFAULT_SAVE_BYTES_PER_S = 5e9
"""Assumed end-to-end save bandwidth of the file-based connector, bytes/s (module docstring)."""

_BF16_BYTES = 2


class EmulatorKvStore:
    """An ExampleConnector-like KV directory for the emulator (module docstring); implements
    `slomesh.engine.model.ExternalKvConnector`.

    Args:
        path: the directory (created if missing).
        model: the modelled model (KV bytes per token, layers).
        block_size: the engine's KV block size, tokens.
        scale: file size relative to the real KV, in (0, 1].
        load_bytes_per_s: load bandwidth of the real-size KV, bytes/s, > 0.
        save_bytes_per_s: save bandwidth of the real-size KV, bytes/s, > 0.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self,
        path: str | Path,
        model: ModelSpec,
        block_size: int,
        *,
        scale: float = 1.0,
        load_bytes_per_s: float = DEFAULT_LOAD_BYTES_PER_S,
        save_bytes_per_s: float = DEFAULT_SAVE_BYTES_PER_S,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 < scale <= 1:
            raise ValueError(f"kv_store_scale must be in (0, 1], got {scale}")
        for name, value in (
            ("kv_store_load_bytes_per_s", load_bytes_per_s),
            ("kv_store_save_bytes_per_s", save_bytes_per_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0 and finite, got {value}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.block_size = block_size
        self.scale = scale
        self.load_bytes_per_s = float(load_bytes_per_s)
        self.save_bytes_per_s = float(save_bytes_per_s)
        full_width = 2 * model.num_kv_heads * model.head_dim * model.dtype_bytes // _BF16_BYTES
        self.width = max(1, round(full_width * scale))
        """Elements per token per layer in the files (K and V of every KV head, scaled)."""

    def folder(self, prefix_token_ids: Sequence[int]) -> Path:
        """The folder of exactly these prefix tokens."""
        return self.path / example_connector_folder_name(prefix_token_ids)

    # -- ExternalKvConnector ---------------------------------------------------------------

    def num_matched_tokens(self, prompt_token_ids: Sequence[int], num_computed_tokens: int) -> int:
        """Tokens beyond the local hit that the prompt's folder holds (0 when it has none).

        Source: vLLM 0.32 ``ExampleConnector.get_num_new_matched_tokens``: the folder of the
        prompt's first ``align(len - 1)`` tokens, all or nothing.
        """
        n = example_connector_lookup_tokens(len(prompt_token_ids), self.block_size)
        if n <= num_computed_tokens or not self.folder(prompt_token_ids[:n]).is_dir():
            return 0
        return n - num_computed_tokens

    def tokens_to_save(self, prompt_token_ids: Sequence[int]) -> int:
        """The stored prefix's tokens, or 0 when its folder exists or it has no whole block."""
        n = example_connector_stored_tokens(len(prompt_token_ids), self.block_size)
        if n == 0 or self.folder(prompt_token_ids[:n]).is_dir():
            return 0
        return n

    def load_time_s(self, num_tokens: int) -> float:
        """``num_tokens * kv_bytes_per_token / load_bytes_per_s`` (the real model's bytes)."""
        return num_tokens * self.model.kv_bytes_per_token / self.load_bytes_per_s

    def save_time_s(self, num_tokens: int) -> float:
        """``num_tokens * kv_bytes_per_token / save_bytes_per_s`` (the real model's bytes)."""
        return num_tokens * self.model.kv_bytes_per_token / self.save_bytes_per_s

    # -- I/O ---------------------------------------------------------------------------------

    def save(self, prompt_token_ids: Sequence[int]) -> Path | None:
        """Writes the prompt's KV folder (atomically); no-op when it exists or is too short.

        Returns:
            The folder written, or None.

        Raises:
            OSError: the directory cannot be written.
        """
        n = example_connector_stored_tokens(len(prompt_token_ids), self.block_size)
        if n == 0:
            return None
        final = self.folder(prompt_token_ids[:n])
        if final.is_dir():
            return None
        tmp = self.path / PARTIAL_DIR / f"emulator-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            # Deterministic filler derived from the folder name: the bytes differ per prefix.
            seed = bytes.fromhex(final.name)
            size = n * self.width * _BF16_BYTES
            data = (seed * (size // len(seed) + 1))[:size]
            for layer in range(self.model.num_layers):
                write_safetensors_file(
                    tmp / f"model.layers.{layer}.self_attn.attn.safetensors",
                    "kv_cache",
                    "BF16",
                    [n, self.width],
                    data,
                )
            try:
                os.rename(tmp, final)
            except OSError:
                if final.is_dir():
                    return None  # written by someone else meanwhile
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final
