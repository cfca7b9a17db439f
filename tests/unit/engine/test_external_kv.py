"""The engine with an external KV connector (vLLM's KV connector semantics) and the emulator's
ExampleConnector-like store."""

from __future__ import annotations

import pytest

from slomesh.emulator.kv_store import EmulatorKvStore
from slomesh.engine.kv_cache import BlockStored
from slomesh.engine.model import Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import DEFAULT_MODEL, get_profile, step_time_s
from slomesh.transfer.stores import (
    ExampleConnectorStore,
    KvStoreConfig,
    example_connector_folder_name,
    read_safetensors_header,
)

BLOCK = 16
PROMPT = [1000 + (i * 37) % 20000 for i in range(1000)]  # 62 whole blocks + 8 tokens
STORED = (len(PROMPT) - 1) // BLOCK * BLOCK  # vLLM's align_to_block_size(len(prompt))
SCALE = 1 / 64


def create_store(path, **kwargs) -> EmulatorKvStore:
    return EmulatorKvStore(path, DEFAULT_MODEL, BLOCK, scale=SCALE, **kwargs)


def create_engine(store=None) -> Engine:
    return Engine(
        get_profile("H100"), DEFAULT_MODEL, EngineConfig(block_size=BLOCK), external_kv=store
    )


def first_step(engine, prompt=PROMPT, request_id="r"):
    engine.add_request(EngineRequest(request_id, prompt, 2), now_s=0.0)
    return engine.step(0.0)


def test_a_finished_prefill_saves_its_prompt_and_pays_for_it(tmp_path):
    store = create_store(tmp_path)
    plain = first_step(create_engine())
    saving = first_step(create_engine(store))
    assert saving.external_kv_saves == [PROMPT]
    assert plain.external_kv_saves == []
    assert saving.duration_s == pytest.approx(plain.duration_s + store.save_time_s(STORED))
    assert store.save_time_s(STORED) == STORED * DEFAULT_MODEL.kv_bytes_per_token / 5e9


def test_a_stored_prefix_is_loaded_instead_of_computed(tmp_path):
    store = create_store(tmp_path)
    folder = store.save(PROMPT)
    assert folder is not None and folder.name == example_connector_folder_name(PROMPT[:STORED])
    engine = create_engine(store)
    result = first_step(engine)
    assert result.num_external_tokens == STORED
    assert result.first_scheduled[0].num_cached_tokens == STORED
    assert result.num_prefill_tokens == len(PROMPT) - STORED
    assert result.external_kv_saves == []  # loaded: nothing to save
    compute = step_time_s(
        engine.profile,
        DEFAULT_MODEL,
        len(PROMPT) - STORED,
        0,
        len(PROMPT),
        attention_pairs=(len(PROMPT) - STORED) * STORED
        + (len(PROMPT) - STORED) * (len(PROMPT) - STORED + 1) / 2,
    )
    assert result.duration_s == pytest.approx(compute + store.load_time_s(STORED))
    # The loaded blocks are in the KV cache now, as prefix-cache blocks.
    stored_blocks = sum(len(e.block_hashes) for e in result.kv_events if isinstance(e, BlockStored))
    assert stored_blocks == len(PROMPT) // BLOCK
    while engine.has_work():
        engine.step(1.0)
    stats = engine.stats()
    assert stats.prompt_tokens_external_kv_transfer == STORED
    assert stats.prompt_tokens_local_cache_hit == 0
    assert stats.prompt_tokens_local_compute == len(PROMPT) - STORED
    assert stats.prompt_tokens_total == len(PROMPT)


def test_a_local_prefix_hit_wins_over_the_external_store(tmp_path):
    store = create_store(tmp_path)
    engine = create_engine(store)
    first_step(engine, request_id="a")
    while engine.has_work():
        engine.step(1.0)
    assert (tmp_path / example_connector_folder_name(PROMPT[:STORED])).exists() is False
    store.save(PROMPT)  # (the runner writes the saves; here by hand)
    result = first_step(engine, request_id="b")
    assert result.num_external_tokens == 0
    assert result.first_scheduled[0].num_cached_tokens == len(PROMPT) // BLOCK * BLOCK


def test_the_store_has_vllm_example_connector_layout(tmp_path):
    store = create_store(tmp_path)
    folder = store.save(PROMPT)
    assert folder is not None
    assert store.save(PROMPT) is None  # exists already
    assert store.save(PROMPT[:BLOCK]) is None  # no whole block before the last token
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(
        f"model.layers.{i}.self_attn.attn.safetensors" for i in range(DEFAULT_MODEL.num_layers)
    )
    real_width = 2 * DEFAULT_MODEL.num_kv_heads * DEFAULT_MODEL.head_dim
    header = read_safetensors_header(folder / files[0])
    assert header["kv_cache"]["dtype"] == "BF16"
    assert header["kv_cache"]["shape"] == [STORED, round(real_width * SCALE)]
    assert not (tmp_path / ".partial").exists() or not any((tmp_path / ".partial").iterdir())
    # The KV transfer service's adapter (a) reads it as an "emulator" store.
    adapter = ExampleConnectorStore(
        KvStoreConfig(
            id="emu-0",
            kind="emulator",
            path=tmp_path,
            model=DEFAULT_MODEL.name,
            block_size=BLOCK,
            num_layers=DEFAULT_MODEL.num_layers,
        )
    )
    manifest = adapter.describe_prefix(PROMPT)
    assert (manifest.object_key, manifest.prefix_tokens) == (folder.name, STORED)
    assert manifest.store_info["kind"] == "emulator"


def test_store_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="kv_store_scale"):
        EmulatorKvStore(tmp_path, DEFAULT_MODEL, BLOCK, scale=0.0)
    with pytest.raises(ValueError, match="kv_store_load_bytes_per_s"):
        EmulatorKvStore(tmp_path, DEFAULT_MODEL, BLOCK, load_bytes_per_s=0)
