"""Store adapters: vLLM ExampleConnector naming and checks, weight cache manifests, safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from slomesh.transfer.objects import DIGEST_SHA256, DIGEST_XXH3_128, file_digest
from slomesh.transfer.stores import (
    WEIGHT_MANIFEST_FILE,
    ExampleConnectorStore,
    IncompatibleStores,
    InvalidObjectRequest,
    ObjectIncomplete,
    ObjectNotFound,
    SafetensorsFormatError,
    WeightCacheConfig,
    WeightCacheStore,
    example_connector_folder_name,
    example_connector_lookup_tokens,
    example_connector_stored_tokens,
    read_safetensors_header,
    validate_model_id,
    write_safetensors_file,
)
from tests.kv_transfer_factories import (
    BLOCK_SIZE,
    NUM_LAYERS,
    kv_store_config,
    tokens,
    write_kv_folder,
    write_weight_model,
)

# vLLM 0.32's own `ExampleConnector._generate_foldername_debug` (safe_hash of
# torch.tensor(ids).numpy().tobytes()) for ids = [i * 7919 % 32000 for i in range(256)],
# computed with the real vLLM environment.
VLLM_IDS = [i * 7919 % 32000 for i in range(256)]
VLLM_FOLDER_256 = "63f2936839bdb9f18091b7846b7b9178"
VLLM_FOLDER_128 = "a78efd8130a4eb45a8d5cc3ebc1b4e8a"


class TestExampleConnectorNaming:
    def test_folder_name_matches_vllm(self):
        assert example_connector_folder_name(VLLM_IDS) == VLLM_FOLDER_256
        assert example_connector_folder_name(VLLM_IDS[:128]) == VLLM_FOLDER_128
        assert len(example_connector_folder_name(VLLM_IDS, "sha256")) == 64

    @pytest.mark.parametrize(
        ("prompt", "stored", "lookup"),
        # vLLM's align_to_block_size(n, 128) = (n - 1) // 128 * 128: store align(n), look up
        # align(n - 1); they differ only when n - 1 is a multiple of the block size.
        [(128, 0, 0), (129, 128, 0), (130, 128, 128), (512, 384, 384), (513, 512, 384)],
    )
    def test_stored_and_lookup_prefix_lengths(self, prompt, stored, lookup):
        assert example_connector_stored_tokens(prompt, 128) == stored
        assert example_connector_lookup_tokens(prompt, 128) == lookup

    def test_unknown_folder_hash_is_refused(self):
        with pytest.raises(ValueError, match="folder_hash"):
            example_connector_folder_name([1, 2], "crc32")


class TestExampleConnectorStore:
    def test_resolves_the_longest_stored_prefix(self, tmp_path):
        store = ExampleConnectorStore(kv_store_config("a", tmp_path))
        prompt = tokens(5 * BLOCK_SIZE + 3)
        short, n_short = write_kv_folder(tmp_path, prompt[: 2 * BLOCK_SIZE + 1])
        long, n_long = write_kv_folder(tmp_path, prompt[: 4 * BLOCK_SIZE + 1])
        assert (n_short, n_long) == (2 * BLOCK_SIZE, 4 * BLOCK_SIZE)
        assert store.resolve_prefix(prompt) == (n_long, long)
        assert store.resolve_prefix(prompt[: 3 * BLOCK_SIZE]) == (n_short, short)
        assert store.resolve_prefix(tokens(4 * BLOCK_SIZE, seed=9)) is None

    def test_describe_lists_layer_files_with_digests(self, tmp_path):
        store = ExampleConnectorStore(kv_store_config("a", tmp_path, num_layers=NUM_LAYERS))
        prompt = tokens(3 * BLOCK_SIZE + 5)
        key, n = write_kv_folder(tmp_path, prompt)
        manifest = store.describe_prefix(prompt)
        assert manifest.object_key == key
        assert manifest.prefix_tokens == n
        assert [f.path for f in manifest.files] == [
            f"model.layers.{i}.self_attn.attn.safetensors" for i in range(NUM_LAYERS)
        ]
        for entry in manifest.files:
            path = tmp_path / key / entry.path
            assert entry.size_bytes == path.stat().st_size
            assert entry.digest_algo == DIGEST_XXH3_128
            assert entry.digest == file_digest(path, DIGEST_XXH3_128)
        assert manifest.store_info == {
            "kind": "vllm_example",
            "model": "tiny-llama",
            "block_size": str(BLOCK_SIZE),
            "kv_dtype": "bfloat16",
            "folder_hash": "md5",
        }

    def test_describe_errors(self, tmp_path):
        store = ExampleConnectorStore(kv_store_config("a", tmp_path, num_layers=NUM_LAYERS + 1))
        prompt = tokens(2 * BLOCK_SIZE + 1)
        with pytest.raises(InvalidObjectRequest, match="at least one KV block"):
            store.describe_prefix(prompt[: BLOCK_SIZE - 1])
        with pytest.raises(ObjectNotFound):
            store.describe_prefix(prompt)
        write_kv_folder(tmp_path, prompt)
        with pytest.raises(ObjectIncomplete, match="layer files"):
            store.describe_prefix(prompt)

    def test_a_file_still_being_written_is_incomplete(self, tmp_path):
        store = ExampleConnectorStore(kv_store_config("a", tmp_path))
        prompt = tokens(2 * BLOCK_SIZE + 1)
        key, _ = write_kv_folder(tmp_path, prompt)
        path = tmp_path / key / "model.layers.1.self_attn.attn.safetensors"
        os.truncate(path, path.stat().st_size - 10)
        with pytest.raises(ObjectIncomplete, match="being written"):
            store.describe_prefix(prompt)

    def test_files_contradicting_the_config_are_refused(self, tmp_path):
        prompt = tokens(2 * BLOCK_SIZE + 1)
        write_kv_folder(tmp_path, prompt, dtype="float16")
        store = ExampleConnectorStore(kv_store_config("a", tmp_path))
        with pytest.raises(IncompatibleStores, match="KV dtype F16"):
            store.describe_prefix(prompt)

    def test_check_compatible_lists_every_difference(self, tmp_path):
        src_root, dst_root = tmp_path / "src", tmp_path / "dst"
        prompt = tokens(2 * BLOCK_SIZE + 1)
        write_kv_folder(src_root, prompt)
        manifest = ExampleConnectorStore(kv_store_config("a", src_root)).describe_prefix(prompt)
        ExampleConnectorStore(kv_store_config("b", dst_root)).check_compatible(manifest)
        other = ExampleConnectorStore(
            kv_store_config("b", dst_root, model="other", block_size=32, kv_dtype="float16")
        )
        with pytest.raises(IncompatibleStores) as err:
            other.check_compatible(manifest)
        for field in ("model", "block_size", "kv_dtype"):
            assert field in str(err.value)
        emulator = ExampleConnectorStore(kv_store_config("b", dst_root, kind="emulator"))
        with pytest.raises(IncompatibleStores, match="kind"):
            emulator.check_compatible(manifest)

    def test_file_path_refuses_escapes(self, tmp_path):
        store = ExampleConnectorStore(kv_store_config("a", tmp_path))
        prompt = tokens(2 * BLOCK_SIZE + 1)
        key, _ = write_kv_folder(tmp_path, prompt)
        with pytest.raises(InvalidObjectRequest):
            store.file_path(key, "../x")
        with pytest.raises(InvalidObjectRequest):
            store.file_path("../" + key, "model.layers.0.self_attn.attn.safetensors")
        with pytest.raises(ObjectNotFound):
            store.file_path(key, "model.layers.9.self_attn.attn.safetensors")

    def test_config_validation(self, tmp_path):
        with pytest.raises(ValueError, match="block_size"):
            kv_store_config("a", tmp_path, block_size=0)
        with pytest.raises(ValueError, match="kv_dtype"):
            kv_store_config("a", tmp_path, kv_dtype="int3")
        with pytest.raises(ValueError, match="id"):
            kv_store_config("../a", tmp_path)


class TestWeightCacheStore:
    def test_describe_model_sha256_per_file(self, tmp_path):
        model_dir = write_weight_model(tmp_path, "org/tiny")
        manifest = WeightCacheStore(WeightCacheConfig(path=tmp_path)).describe_model("org/tiny")
        assert [f.path for f in manifest.files] == sorted(
            ["config.json", "model.safetensors.index.json"]
            + [p.name for p in model_dir.glob("*.safetensors")]
        )
        for entry in manifest.files:
            assert entry.digest_algo == DIGEST_SHA256
            assert entry.digest == hashlib.sha256((model_dir / entry.path).read_bytes()).hexdigest()
        assert manifest.store_info["dtype"] == "bfloat16"

    def test_not_a_safetensors_model(self, tmp_path):
        (tmp_path / "org" / "bin").mkdir(parents=True)
        (tmp_path / "org" / "bin" / "config.json").write_text("{}")
        (tmp_path / "org" / "bin" / "pytorch_model.bin").write_bytes(b"x")
        cache = WeightCacheStore(WeightCacheConfig(path=tmp_path))
        with pytest.raises(IncompatibleStores, match="not a safetensors model"):
            cache.describe_model("org/bin")
        with pytest.raises(ObjectNotFound):
            cache.describe_model("org/missing")
        with pytest.raises(InvalidObjectRequest):
            cache.describe_model("../etc")

    def test_expected_sha256_and_dtype_checks(self, tmp_path):
        write_weight_model(tmp_path, "org/tiny", torch_dtype="float16")
        cache = WeightCacheStore(WeightCacheConfig(path=tmp_path))
        manifest = cache.describe_model("org/tiny")
        good = {f.path: f.digest for f in manifest.files}
        cache.describe_model("org/tiny", expected_sha256=good)
        bad = dict(good, **{"config.json": "0" * 64})
        with pytest.raises(IncompatibleStores, match="config.json"):
            cache.describe_model("org/tiny", expected_sha256=bad)
        bf16_cache = WeightCacheStore(WeightCacheConfig(path=tmp_path / "other", dtype="bfloat16"))
        with pytest.raises(IncompatibleStores, match="float16"):
            bf16_cache.check_compatible(manifest)
        WeightCacheStore(WeightCacheConfig(path=tmp_path / "any")).check_compatible(manifest)

    def test_recorded_digests_are_reused_only_while_files_are_unchanged(self, tmp_path):
        model_dir = write_weight_model(tmp_path, "org/tiny")
        cache = WeightCacheStore(WeightCacheConfig(path=tmp_path))
        shard = next(model_dir.glob("*.safetensors"))
        st = shard.stat()
        fake = "f" * 64
        record = {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": fake}
        (model_dir / WEIGHT_MANIFEST_FILE).write_text(json.dumps({"files": {shard.name: record}}))
        assert cache.describe_model("org/tiny").file(shard.name).digest == fake
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        real = hashlib.sha256(shard.read_bytes()).hexdigest()
        assert cache.describe_model("org/tiny").file(shard.name).digest == real

    def test_model_ids(self):
        assert validate_model_id("meta-llama/Llama-3.1-8B-Instruct")
        for bad in ("", "/abs", "a//b", ".hidden/x", "a/../b", "a/b/c/d/e"):
            with pytest.raises(InvalidObjectRequest):
                validate_model_id(bad)


class TestSafetensors:
    def test_round_trip(self, tmp_path):
        path = tmp_path / "t.safetensors"
        write_safetensors_file(path, "kv_cache", "BF16", [4, 2, 8], bytes(range(128)))
        header = read_safetensors_header(path)
        assert header == {
            "kv_cache": {"dtype": "BF16", "shape": [4, 2, 8], "data_offsets": [0, 128]}
        }
        assert path.read_bytes()[-128:] == bytes(range(128))
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert header_len % 8 == 0

    def test_truncated_or_malformed_files_are_refused(self, tmp_path):
        path = tmp_path / "t.safetensors"
        write_safetensors_file(path, "w", "F32", [8], bytes(32))
        os.truncate(path, path.stat().st_size - 1)
        with pytest.raises(SafetensorsFormatError, match="being written"):
            read_safetensors_header(path)
        path.write_bytes(struct.pack("<Q", 10**12))
        with pytest.raises(SafetensorsFormatError, match="beyond the file"):
            read_safetensors_header(path)
        with pytest.raises(ValueError, match="do not fill"):
            write_safetensors_file(path, "w", "F32", [8], bytes(31))
