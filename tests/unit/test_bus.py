from __future__ import annotations

import pytest

from slomesh import bus


def test_subjects_follow_the_design():
    assert bus.state_subject("tokyo") == "slomesh.region.tokyo.state"
    assert bus.kv_subject("tokyo") == "slomesh.region.tokyo.kv"
    assert bus.kv_snapshot_subject("tokyo") == "slomesh.region.tokyo.kv.snapshot"
    assert bus.rtt_subject("tokyo") == "slomesh.region.tokyo.rtt"


def test_region_of_subject():
    assert bus.region_of_subject("slomesh.region.washington-dc.state") == "washington-dc"
    assert bus.region_of_subject(bus.kv_snapshot_subject("frankfurt")) == "frankfurt"
    with pytest.raises(ValueError):
        bus.region_of_subject("other.tokyo.state")


def test_links_subject_and_wildcard():
    assert bus.links_subject("tokyo") == "slomesh.region.tokyo.links"
    assert bus.region_of_subject(bus.links_subject("frankfurt")) == "frankfurt"
    assert bus.ALL_LINKS == "slomesh.region.*.links"
