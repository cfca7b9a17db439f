"""SLO classes: targets, attainment, YAML overrides, validation errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from slomesh.slo import (
    DEFAULT_SLO_CLASS,
    SloClass,
    SloConfigError,
    load_slo_classes,
    load_slo_config,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    return path


class TestDefaults:
    def test_design_table(self):
        classes = load_slo_classes()
        assert set(classes) == {"chat", "coding", "summarization", "batch"}
        assert DEFAULT_SLO_CLASS == "chat"
        assert classes["chat"].ttft_target_ms(1000) == 500 + 0.25 * 1000
        assert classes["chat"].tpot_ms == 100
        assert classes["coding"].ttft_target_ms(2000) == 500 + 0.25 * 2000
        assert classes["coding"].tpot_ms == 50
        assert classes["summarization"].ttft_target_ms(4000) == 1000 + 0.5 * 4000
        assert classes["summarization"].tpot_ms == 150
        batch = classes["batch"]
        assert batch.e2e_ms == 60_000
        assert batch.ttft_target_ms(10_000) == math.inf
        assert batch.tpot_target_ms() == math.inf
        assert batch.on_infeasible == "best_effort"
        assert classes["chat"].on_infeasible == "refuse"

    def test_config_file_spells_out_the_defaults(self):
        from_file = load_slo_config(REPO / "configs" / "slo_classes.yaml")
        assert from_file == load_slo_config()

    def test_positional_construction(self):
        slo = SloClass("tool", 300, 0.1, 40, None)
        assert (slo.name, slo.ttft_base_ms, slo.ttft_per_prompt_token_ms, slo.tpot_ms) == (
            "tool",
            300,
            0.1,
            40,
        )
        with pytest.raises(TypeError):
            SloClass("tool", 300, ttft_base_ms=200)


class TestAttained:
    def test_ttft_and_tpot_both_required(self):
        chat = load_slo_classes()["chat"]
        target = chat.ttft_target_ms(400)  # 600 ms
        assert chat.attained(target, 100, 99_999, 400)
        assert not chat.attained(target + 0.1, 50, 1000, 400)
        assert not chat.attained(100, 100.1, 1000, 400)

    def test_ttft_target_grows_with_prompt(self):
        chat = load_slo_classes()["chat"]
        assert chat.attained(2000, 50, 3000, 8000)  # target 2500 ms
        assert not chat.attained(2000, 50, 3000, 4000)  # target 1500 ms

    def test_batch_is_judged_by_e2e_only(self):
        batch = load_slo_classes()["batch"]
        assert batch.attained(50_000, 500, 59_999, 100)
        assert not batch.attained(10, 1, 60_001, 100)

    def test_nan_never_attains(self):
        chat = load_slo_classes()["chat"]
        assert not chat.attained(float("nan"), 10, 100, 10)


class TestYamlOverride:
    def test_field_override_keeps_other_fields_and_classes(self, tmp_path):
        config = load_slo_config(write(tmp_path, "classes:\n  chat: {tpot_ms: 80}\n"))
        chat = config.classes["chat"]
        assert chat.tpot_ms == 80 and chat.ttft_base_ms == 500
        assert set(config.classes) == {"chat", "coding", "summarization", "batch"}

    def test_new_class_and_default_class(self, tmp_path):
        text = """
default_class: tool
classes:
  tool: {ttft_base_ms: 300, ttft_per_prompt_token_ms: 0.1, tpot_ms: 40}
"""
        config = load_slo_config(write(tmp_path, text))
        assert config.default_class == "tool"
        assert config.classes["tool"].ttft_target_ms(100) == pytest.approx(310)

    def test_null_removes_a_target(self, tmp_path):
        config = load_slo_config(write(tmp_path, "classes:\n  chat: {tpot_ms: null}\n"))
        assert config.classes["chat"].tpot_target_ms() == math.inf

    def test_tenants(self, tmp_path):
        text = ("tenants:\n  acme-eu: {allowed_regions: [frankfurt]}\n"
                "  nightly: {on_infeasible: best_effort}\n")
        tenants = load_slo_config(write(tmp_path, text)).tenants
        assert tenants["acme-eu"].allowed_regions == {"frankfurt"}
        assert tenants["acme-eu"].on_infeasible is None
        assert tenants["nightly"].on_infeasible == "best_effort"
        assert not tenants["nightly"].allowed_regions
        assert tenants["nightly"].priority is None
        assert load_slo_config().tenants == {}

    def test_priorities(self, tmp_path):
        text = ("classes:\n  batch: {priority: 2}\n"
                "tenants:\n  vip: {priority: -1}\n")
        config = load_slo_config(write(tmp_path, text))
        assert config.classes["batch"].priority == 2
        assert config.classes["chat"].priority == 0  # the built-in default
        assert config.tenants["vip"].priority == -1

    def test_replace_defaults(self, tmp_path):
        text = "replace_defaults: true\ndefault_class: only\nclasses:\n  only: {e2e_ms: 1000}\n"
        assert set(load_slo_classes(write(tmp_path, text))) == {"only"}


class TestBadValues:
    @pytest.mark.parametrize(
        ("text", "field"),
        [
            ("classes:\n  chat: {tpot_ms: -3}\n", "classes.chat.tpot_ms"),
            ("classes:\n  chat: {ttft_base_ms: 0}\n", "classes.chat.ttft_base_ms"),
            (
                "classes:\n  chat: {ttft_per_prompt_token_ms: -1}\n",
                "classes.chat.ttft_per_prompt_token_ms",
            ),
            (
                "classes:\n  chat: {default_output_tokens: 0}\n",
                "classes.chat.default_output_tokens",
            ),
            ("classes:\n  chat: {on_infeasible: maybe}\n", "classes.chat.on_infeasible"),
            ("classes:\n  chat: {colour: red}\n", "classes.chat.colour"),
            ("default_class: gold\n", "default_class"),
            ("classez: {}\n", "classez"),
            ("classes:\n  x: {ttft_per_prompt_token_ms: 1}\n", "classes.x"),
            ("classes:\n  'bad name!': {e2e_ms: 5}\n", "classes.bad name!.name"),
            ("tenants:\n  t: {on_infeasible: maybe}\n", "tenants.t.on_infeasible"),
            ("classes:\n  chat: {priority: urgent}\n", "classes.chat.priority"),
            ("classes:\n  chat: {priority: 4294967296}\n", "classes.chat.priority"),
            ("tenants:\n  t: {priority: 1.5}\n", "tenants.t.priority"),
            ("tenants:\n  t: {regions: [x]}\n", "tenants.t.regions"),
            ("tenants:\n  t: [frankfurt]\n", "tenants.t"),
            ("tenants: [a]\n", "tenants"),
        ],
    )
    def test_error_names_the_field(self, tmp_path, text, field):
        with pytest.raises(SloConfigError) as info:
            load_slo_config(write(tmp_path, text))
        assert field in str(info.value)

    def test_direct_construction_names_the_field(self):
        with pytest.raises(ValueError, match="tpot_ms"):
            SloClass("x", 100, 0.1, -5, None)
        with pytest.raises(ValueError, match="at least one of"):
            SloClass("x")

    def test_unreadable_and_invalid_yaml(self, tmp_path):
        with pytest.raises(SloConfigError, match="cannot read"):
            load_slo_config(tmp_path / "missing.yaml")
        with pytest.raises(SloConfigError, match="not valid YAML"):
            load_slo_config(write(tmp_path, "classes: [\n"))
        with pytest.raises(SloConfigError, match="mapping"):
            load_slo_config(write(tmp_path, yaml.safe_dump([1, 2])))
