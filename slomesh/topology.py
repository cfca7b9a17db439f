"""Mesh topology: regions, their engine instances and GPU types, prices and RTTs.

A topology file (YAML) names the regions of a mesh and the instances in each. Round-trip times
between regions come from the RTT matrix `rtt_ms.csv` and GPU prices from `gpu_prices.csv`
(both under `../shared/data/regions/`, see its SOURCES.md), so a topology only says *where*
things are; the numbers are the measured ones.

Example (one model, the original form)::

    model: {name: meta-llama/Llama-3.1-8B-Instruct}
    regions:
      - name: washington-dc          # slug, used in NATS subjects and the CLI
        location: Washington DC      # row/column name in rtt_ms.csv
        cloud_region: us-east-1      # region column in gpu_prices.csv
        egress_usd_per_gb: 0.02
        instances:
          - {id: wdc-h100-0, gpu_type: H100}

**Several models** (``models:`` instead of ``model:``; see ``configs/topology.multimodel.yaml``):
each instance serves one model at a time -- its ``model:``, default the first of ``models`` --
and an instance marked ``swappable`` may be switched to another model while it is idle. Such a
switch costs ``M_q`` (`slomesh.engine.profiles.model_load_time_s`): the region's
``model_load_overhead_s`` plus the model's weights over the bandwidth of the region's local
weight cache (``weight_cache_gb_per_s``) when the cache holds the model, else over the remote
store's (``remote_weights_gb_per_s``). A region's weight cache holds the models of its
``weight_cache:`` list and every model one of its instances serves at start (those weights are
on its disks already)::

    models:
      - {name: meta-llama/Llama-3.1-8B-Instruct, max_model_len: 131072}
      - {name: Qwen/Qwen2.5-7B-Instruct, max_model_len: 32768}
    regions:
      - name: washington-dc
        ...
        weight_cache: [Qwen/Qwen2.5-7B-Instruct]
        instances:
          - {id: wdc-h100-0, gpu_type: H100}                     # the first model
          - {id: wdc-l40s-0, gpu_type: L40S, model: Qwen/Qwen2.5-7B-Instruct, swappable: true}

The architecture of a model (layers, heads, parameters) is the engine model's
(`slomesh.engine.profiles.MODELS`), which the emulator, the simulator and the predictor share;
a topology names the model and may override the size of its weights (``weights_bytes``, e.g.
for a quantised checkpoint). A model the engine model does not know may still be named (a
real vLLM serves it); in a topology of several models it must then give ``weights_bytes``.

Load-time defaults (configurable assumptions, per region): ``weight_cache_gb_per_s`` 2.0
(safetensors from local NVMe into GPU memory; NVMe reads at 3-7 GB/s, vLLM's loader lands
well below that), ``remote_weights_gb_per_s`` 0.5 (a node's download from an object store or
the Hugging Face hub, about 4 Gbit/s), ``model_load_overhead_s`` 20 (torch.compile, CUDA-graph
capture, KV-cache profiling and warm-up of an 8B model; the phases of a vLLM cold start are
broken down in Tensorfuse's "Reducing GPU Cold Start Time when using vLLM", 2025, and
"Breaking the Ice: Analyzing Cold Start Latency in vLLM", arXiv:2606.07362). Measure your own
and set them.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

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
        default=None,
        ge=1,
        description="Context limit in tokens of the model served at start; None = the "
        "model's. After a switch to another model: the largest context the GPU's KV cache "
        "holds of it, up to its max_model_len.",
    )
    model: str | None = Field(
        default=None,
        description="Model the instance serves at start (a name of the topology's models); "
        "None = the first model.",
    )
    swappable: bool = Field(
        default=False,
        description="The scheduler may switch the instance to another model of the topology "
        "while it is idle (paying the model load time M_q).",
    )
    model_load_overhead_s: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Engine start-up time besides reading weights, seconds; None = the "
        "region's model_load_overhead_s.",
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
    weight_cache: list[str] = Field(
        default_factory=list,
        description="Models whose weights the region's local cache holds besides those its "
        "instances serve at start (names of the topology's models).",
    )
    weight_cache_gb_per_s: float = Field(
        default=2.0,
        gt=0,
        allow_inf_nan=False,
        description="Bandwidth of loading weights from the region's local cache into GPU "
        "memory, GB/s (configurable assumption: local NVMe through vLLM's loader).",
    )
    remote_weights_gb_per_s: float = Field(
        default=0.5,
        gt=0,
        allow_inf_nan=False,
        description="Bandwidth of loading weights the region's cache lacks (remote object "
        "store or another region), GB/s (configurable assumption: ~4 Gbit/s per node).",
    )
    model_load_overhead_s: float = Field(
        default=20.0,
        ge=0,
        allow_inf_nan=False,
        description="Engine start-up time of a model switch besides reading weights "
        "(torch.compile, CUDA-graph capture, warm-up), seconds (configurable assumption).",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"region name {value!r} must match {_SLUG.pattern}")
        return value


DEFAULT_LINK_CAPACITY_BYTES_PER_S = 625e6
"""Default capacity of an inter-region link for the KV transfer services, bytes/s: 5 Gbit/s,
the bandwidth AWS gives one TCP flow between instances outside a cluster placement group and
the multi-flow limit to other regions of an instance with fewer than 32 vCPUs ("Amazon EC2
instance network bandwidth", EC2 user guide). A configurable assumption: measure your own."""


class LinkSpec(BaseModel):
    """Capacity of the WAN link between two regions for the KV transfer services.

    Applies to ``src -> dst``, and to ``dst -> src`` too unless another entry gives that
    direction.
    """

    model_config = ConfigDict(extra="forbid")

    src: str = Field(description="Region slug the link leaves.")
    dst: str = Field(description="Region slug the link reaches.")
    capacity_bytes_per_s: float = Field(
        gt=0, allow_inf_nan=False, description="Capacity of the link, bytes/s."
    )


class ModelSpecRef(BaseModel):
    """A served model, by name (its architecture lives in `slomesh.engine.profiles.MODELS`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = DEFAULT_MODEL_NAME
    max_model_len: int = Field(default=32768, ge=16)
    stream_interval: int = Field(
        default=1,
        ge=1,
        description="Tokens per streamed chunk after the first, set on every engine "
        "(vLLM's --stream-interval): larger values cut per-token host work on every hop.",
    )
    weights_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Bytes of weights an engine loads to serve the model; None = the engine "
        "model's num_params x dtype_bytes (`ModelSpec.weight_bytes`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        # `model: <name>` is short for `model: {name: <name>}`.
        return {"name": data} if isinstance(data, str) else data

    @property
    def resolved_weights_bytes(self) -> int | None:
        """`weights_bytes`, else the engine model's weight bytes; None for a model the engine
        model does not know and whose size the topology does not give."""
        if self.weights_bytes is not None:
            return self.weights_bytes
        from slomesh.engine.profiles import MODELS

        spec = MODELS.get(self.name)
        return spec.weight_bytes if spec is not None else None


class Topology(BaseModel):
    """A mesh: the models it serves and its regions.

    ``models`` lists every model the mesh serves; ``model`` is the first of them (the default
    model, which instances without a ``model:`` serve). A file gives either ``model:`` (one
    model, the original form) or ``models:``; given both, ``model`` must equal the first of
    ``models`` (as a dump of a topology has it).

    Raises (on construction): `pydantic.ValidationError` naming the field for duplicate names,
    unknown locations in the RTT matrix, GPU types without a price in the cloud region, an
    instance or weight cache naming a model the topology does not list, or (with several
    models) a model of unknown size.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelSpecRef = Field(default_factory=ModelSpecRef)
    models: list[ModelSpecRef] = Field(default_factory=list)
    regions: list[RegionSpec] = Field(min_length=1)
    rtt_file: Path | None = Field(default=None, description="RTT matrix CSV; None = shared data.")
    prices_file: Path | None = Field(default=None, description="GPU prices CSV; None = shared.")
    default_link_capacity_bytes_per_s: float = Field(
        default=DEFAULT_LINK_CAPACITY_BYTES_PER_S,
        gt=0,
        allow_inf_nan=False,
        description="Capacity of every inter-region link that `links` does not name, bytes/s "
        "(KV transfer services' bandwidth schedulers and the local mesh's emulated WAN).",
    )
    links: list[LinkSpec] = Field(
        default_factory=list, description="Capacities of particular inter-region links."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_or_many_models(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        single, many = data.get("model"), data.get("models")
        if many is None or many == []:
            if many is not None and single is None:
                raise ValueError("models: must list at least one model")
            data = {**data, "models": [single if single is not None else {}]}
        elif single is None:
            if not isinstance(many, list):
                return data
            data = {**data, "model": many[0]}
        else:
            first = ModelSpecRef.model_validate(many[0]) if isinstance(many, list) else None
            if first is None or ModelSpecRef.model_validate(single) != first:
                raise ValueError(
                    "model: give either model (one model) or models (several); with both, "
                    "model must be the first of models"
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> Topology:
        model_names = [m.name for m in self.models]
        if len(set(model_names)) != len(model_names):
            raise ValueError(f"models: duplicate model names in {model_names}")
        known = set(model_names)
        for region in self.regions:
            for inst in region.instances:
                if inst.model is not None and inst.model not in known:
                    raise ValueError(
                        f"regions.instances.model: {inst.model!r} (instance {inst.id}) is not "
                        f"one of the topology's models {model_names}"
                    )
            for name in region.weight_cache:
                if name not in known:
                    raise ValueError(
                        f"regions.weight_cache: {name!r} (region {region.name}) is not one of "
                        f"the topology's models {model_names}"
                    )
        if len(self.models) > 1:
            for m in self.models:
                if m.resolved_weights_bytes is None:
                    raise ValueError(
                        f"models.weights_bytes: required for {m.name!r}, which the engine "
                        "model does not know (slomesh.engine.profiles.MODELS), in a topology "
                        "of several models"
                    )
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

    @model_validator(mode="after")
    def _check_links(self) -> Topology:
        names = {r.name for r in self.regions}
        seen: set[tuple[str, str]] = set()
        for link in self.links:
            for end in (link.src, link.dst):
                if end not in names:
                    raise ValueError(f"links: unknown region {end!r} (regions: {sorted(names)})")
            if link.src == link.dst:
                raise ValueError(f"links: a link joins two regions, got {link.src!r} twice")
            if (link.src, link.dst) in seen:
                raise ValueError(f"links: {link.src} -> {link.dst} given twice")
            seen.add((link.src, link.dst))
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

    @property
    def model_names(self) -> list[str]:
        """Names of the models the mesh serves, the default (first) one first."""
        return [m.name for m in self.models]

    def model_ref(self, name: str) -> ModelSpecRef:
        """The model named `name`. Raises KeyError for a model the topology does not list."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"unknown model {name!r} (topology models: {self.model_names})")

    def instance_spec(self, instance_id: str) -> InstanceSpec:
        """The instance `instance_id`. Raises KeyError for an unknown instance."""
        region = self.instance_region(instance_id)
        return next(i for i in region.instances if i.id == instance_id)

    def instance_model(self, instance_id: str) -> ModelSpecRef:
        """The model `instance_id` serves at start (its ``model:``, else the first model).

        Raises:
            KeyError: an unknown instance.
        """
        spec = self.instance_spec(instance_id)
        return self.model_ref(spec.model) if spec.model is not None else self.models[0]

    def instance_max_model_len(self, instance_id: str) -> int:
        """Context limit of `instance_id` at start: its ``max_model_len``, else its model's.

        Raises:
            KeyError: an unknown instance.
        """
        spec = self.instance_spec(instance_id)
        return spec.max_model_len or self.instance_model(instance_id).max_model_len

    def model_load_overhead_s(self, instance_id: str) -> float:
        """Engine start-up time of a model switch on `instance_id` besides reading weights,
        seconds: the instance's ``model_load_overhead_s``, else its region's.

        Raises:
            KeyError: an unknown instance.
        """
        spec = self.instance_spec(instance_id)
        if spec.model_load_overhead_s is not None:
            return spec.model_load_overhead_s
        return self.instance_region(instance_id).model_load_overhead_s

    def model_load_s(
        self, instance_id: str, model: str, weight_cache_models: Sequence[str]
    ) -> tuple[float, bool]:
        """``M_q`` of switching `instance_id` to `model`: the instance's start-up overhead
        plus the model's weights over its region's weight-cache bandwidth when the cache
        holds the model, else over the remote store's
        (`slomesh.engine.profiles.model_load_time_s`), as the simulator and the live region
        agent time a switch.

        Args:
            instance_id: The instance switching.
            model: The model it loads.
            weight_cache_models: Models its region's weight cache holds now.

        Returns:
            (load seconds, whether the weights come from the region's cache).

        Raises:
            KeyError: an unknown instance or model, or a model whose size is unknown.
        """
        from slomesh.engine.profiles import model_load_time_s

        ref = self.model_ref(model)
        weights_bytes = ref.resolved_weights_bytes
        if weights_bytes is None:
            raise KeyError(f"model {model!r}: size of its weights unknown (weights_bytes)")
        region = self.instance_region(instance_id)
        from_cache = model in weight_cache_models
        bandwidth = (
            region.weight_cache_gb_per_s if from_cache else region.remote_weights_gb_per_s
        )
        load_s = model_load_time_s(
            weights_bytes,
            load_gb_per_s=bandwidth,
            overhead_s=self.model_load_overhead_s(instance_id),
        )
        return load_s, from_cache

    def weight_cache_models(self, region: str) -> list[str]:
        """Models whose weights `region`'s local cache holds at start: the models its
        instances serve, then its ``weight_cache:`` list (no repeats, in that order).

        Raises:
            KeyError: an unknown region.
        """
        spec = self.region(region)
        out: list[str] = []
        for inst in spec.instances:
            name = self.instance_model(inst.id).name
            if name not in out:
                out.append(name)
        for name in spec.weight_cache:
            if name not in out:
                out.append(name)
        return out

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

    def link_capacity_bytes_per_s(self, src_region: str, dst_region: str) -> float:
        """Capacity of the WAN link `src_region` -> `dst_region`, bytes/s.

        The ``links`` entry for that direction, else the one for the other direction, else
        ``default_link_capacity_bytes_per_s``.

        Raises:
            KeyError: an unknown region, or src_region == dst_region (no WAN link).
        """
        for name in (src_region, dst_region):
            self.region(name)
        if src_region == dst_region:
            raise KeyError(f"no WAN link from {src_region!r} to itself")
        by_pair = {(link.src, link.dst): link.capacity_bytes_per_s for link in self.links}
        capacity = by_pair.get((src_region, dst_region), by_pair.get((dst_region, src_region)))
        return capacity if capacity is not None else self.default_link_capacity_bytes_per_s

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
