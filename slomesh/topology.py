"""Mesh topology: regions, their engine instances and GPU types, prices and RTTs.

A topology file (YAML) names the regions of a mesh and the instances in each. Round-trip times
between regions come from the RTT matrix `rtt_ms.csv` and GPU prices from `gpu_prices.csv`
(both under `../shared/data/regions/`, see its SOURCES.md), so a topology only says *where*
things are; the numbers are the measured ones.

Example::

    model: meta-llama/Llama-3.1-8B-Instruct
    regions:
      - name: washington-dc          # slug, used in NATS subjects and the CLI
        location: Washington DC      # row/column name in rtt_ms.csv
        cloud_region: us-east-1      # region column in gpu_prices.csv
        egress_usd_per_gb: 0.02
        instances:
          - {id: wdc-h100-0, gpu_type: H100}
"""

from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GpuType = Literal["H100", "A100", "L40S", "A10G", "L4"]
"""GPU types with a performance profile in `slomesh.engine.profiles`."""

_SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
_REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOPOLOGY_PATH = _REPO_ROOT / "configs" / "topology.default.yaml"
DEFAULT_MODEL_NAME = "meta-llama/Llama-3.1-8B-Instruct"


def shared_data_dir() -> Path:
    """Directory of the shared data sets (`traces/`, `regions/`).

    Resolution order: env `SLOMESH_SHARED_DATA`; `../shared/data` beside the checkout (as CI
    lays it out); `../shared/data` beside the current working directory.

    Raises:
        FileNotFoundError: when none of them exists.
    """
    candidates = []
    env = os.environ.get("SLOMESH_SHARED_DATA")
    if env:
        candidates.append(Path(env))
    candidates += [_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for path in candidates:
        if (path / "regions" / "rtt_ms.csv").is_file():
            return path
    raise FileNotFoundError(
        "shared data not found; set SLOMESH_SHARED_DATA or place ../shared/data beside the "
        f"checkout (looked in: {', '.join(str(p) for p in candidates)})"
    )


class InstanceSpec(BaseModel):
    """One engine instance (one vLLM server or emulator) in a region."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Instance id, unique in the mesh ([a-z0-9-]).")
    gpu_type: GpuType = Field(description="GPU type of the instance's performance profile.")
    spot: bool = Field(default=False, description="Priced at the spot rate instead of on-demand.")
    max_model_len: int | None = Field(
        default=None, ge=1, description="Context limit in tokens; None = the model's."
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"instance id {value!r} must match {_SLUG.pattern}")
        return value


class RegionSpec(BaseModel):
    """One region: a name, where it is (for RTTs), which cloud region (for prices)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Region slug ([a-z0-9-]), used in NATS subjects.")
    location: str = Field(description="Region name in the RTT matrix (e.g. 'Washington DC').")
    cloud_region: str = Field(description="Cloud region in gpu_prices.csv (e.g. 'us-east-1').")
    egress_usd_per_gb: float = Field(
        default=0.02, ge=0, description="Price of bytes leaving the region, USD per GB."
    )
    instances: list[InstanceSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"region name {value!r} must match {_SLUG.pattern}")
        return value


class ModelSpecRef(BaseModel):
    """The served model, by name (its architecture lives in `slomesh.engine.profiles`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = DEFAULT_MODEL_NAME
    max_model_len: int = Field(default=32768, ge=16)
    stream_interval: int = Field(
        default=1,
        ge=1,
        description="Tokens per streamed chunk after the first, set on every engine "
        "(vLLM's --stream-interval): larger values cut per-token host work on every hop.",
    )


class Topology(BaseModel):
    """A mesh: the model it serves and its regions.

    Raises (on construction): `pydantic.ValidationError` naming the field for duplicate names,
    unknown locations in the RTT matrix, or GPU types without a price in the cloud region.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelSpecRef = Field(default_factory=ModelSpecRef)
    regions: list[RegionSpec] = Field(min_length=1)
    rtt_file: Path | None = Field(default=None, description="RTT matrix CSV; None = shared data.")
    prices_file: Path | None = Field(default=None, description="GPU prices CSV; None = shared.")

    @model_validator(mode="after")
    def _check(self) -> Topology:
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise ValueError(f"regions: duplicate region names in {names}")
        ids = [i.id for r in self.regions for i in r.instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"regions.instances: duplicate instance ids in {ids}")
        rtts = _load_rtt_matrix(str(self._rtt_path()))
        locations = {src for src, _ in rtts}
        for region in self.regions:
            if region.location not in locations:
                raise ValueError(
                    f"regions.location: {region.location!r} is not in the RTT matrix "
                    f"(known: {sorted(locations)})"
                )
        prices = _load_prices(str(self._prices_path()))
        for region in self.regions:
            for inst in region.instances:
                if (inst.gpu_type, region.cloud_region) not in prices:
                    raise ValueError(
                        f"regions.instances.gpu_type: no price for {inst.gpu_type} in "
                        f"{region.cloud_region} (instance {inst.id})"
                    )
        return self

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        """Loads a topology YAML file.

        Raises:
            FileNotFoundError: the file does not exist.
            pydantic.ValidationError: the content is invalid (the message names the field).
        """
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        return cls.model_validate(data)

    @classmethod
    def default(cls) -> Topology:
        """The default local mesh: Washington DC, Frankfurt and Tokyo, 2 instances each."""
        return cls.load(DEFAULT_TOPOLOGY_PATH)

    # -- queries ---------------------------------------------------------------------------

    def region(self, name: str) -> RegionSpec:
        """The region named `name`. Raises KeyError for an unknown region."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"unknown region {name!r}")

    @property
    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    def instance_region(self, instance_id: str) -> RegionSpec:
        """The region holding `instance_id`. Raises KeyError for an unknown instance."""
        for region in self.regions:
            if any(i.id == instance_id for i in region.instances):
                return region
        raise KeyError(f"unknown instance {instance_id!r}")

    def rtt_ms(self, src_region: str, dst_region: str) -> float:
        """Measured round-trip time between two regions of this topology, in ms.

        Args:
            src_region, dst_region: region slugs (or RTT-matrix locations).

        Returns:
            The RTT from the matrix (0.0 for the same region). Where the matrix lacks one
            direction the other is used.

        Raises:
            KeyError: an unknown region or a pair absent from the matrix.
        """
        src = self._location(src_region)
        dst = self._location(dst_region)
        if src == dst:
            return 0.0
        rtts = _load_rtt_matrix(str(self._rtt_path()))
        if (src, dst) in rtts:
            return rtts[(src, dst)]
        if (dst, src) in rtts:
            return rtts[(dst, src)]
        raise KeyError(f"no RTT between {src!r} and {dst!r}")

    def gpu_price_usd_per_hour(self, gpu_type: str, cloud_region: str) -> tuple[float, float]:
        """Price of ONE GPU of `gpu_type` in `cloud_region`, USD per hour.

        Instance prices are divided by the instance's accelerator count (8 for p5/p4d).

        Returns:
            (on_demand, spot); spot falls back to on-demand when the catalog has none.

        Raises:
            KeyError: no price for this GPU type in this region.
        """
        prices = _load_prices(str(self._prices_path()))
        try:
            return prices[(gpu_type, cloud_region)]
        except KeyError:
            raise KeyError(f"no price for {gpu_type} in {cloud_region}") from None

    def instance_price_usd_per_hour(self, instance_id: str) -> float:
        """The price the instance is billed at (spot or on-demand), USD per hour."""
        region = self.instance_region(instance_id)
        inst = next(i for i in region.instances if i.id == instance_id)
        on_demand, spot = self.gpu_price_usd_per_hour(inst.gpu_type, region.cloud_region)
        return spot if inst.spot else on_demand

    def _location(self, name: str) -> str:
        for region in self.regions:
            if name in (region.name, region.location):
                return region.location
        raise KeyError(f"unknown region {name!r}")

    def _rtt_path(self) -> Path:
        return self.rtt_file or shared_data_dir() / "regions" / "rtt_ms.csv"

    def _prices_path(self) -> Path:
        return self.prices_file or shared_data_dir() / "regions" / "gpu_prices.csv"


@functools.lru_cache(maxsize=8)
def _load_rtt_matrix(path: str) -> dict[tuple[str, str], float]:
    """Reads `src_region,dst_region,rtt_ms` rows into {(src, dst): rtt_ms}."""
    out: dict[tuple[str, str], float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[(row["src_region"], row["dst_region"])] = float(row["rtt_ms"])
    if not out:
        raise ValueError(f"{path}: empty RTT matrix")
    return out


@functools.lru_cache(maxsize=8)
def _load_prices(path: str) -> dict[tuple[str, str], tuple[float, float]]:
    """Reads gpu_prices.csv into {(accelerator, region): (on_demand, spot)} per GPU per hour.

    Where several instance types offer the same accelerator in a region, the cheapest
    on-demand price per GPU is kept.
    """
    out: dict[tuple[str, str], tuple[float, float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            count = int(row["accelerator_count"])
            on_demand = float(row["price_per_hour_usd"]) / count
            spot_raw = row.get("spot_price_per_hour_usd") or ""
            spot = float(spot_raw) / count if spot_raw.strip() else on_demand
            key = (row["accelerator"], row["region"])
            if key not in out or on_demand < out[key][0]:
                out[key] = (on_demand, spot)
    return out
