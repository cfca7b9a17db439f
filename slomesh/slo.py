"""Service-level objective (SLO) classes: latency targets per class of request.

A request attains its SLO when its time to first token (TTFT) is within the class's TTFT target
**and** its mean time per output token (TPOT) is within the class's TPOT target; a class may
instead (or also) bound the end-to-end latency (E2E), as the ``batch`` class does. Targets are
what the *client* sees, WAN round trips included (DESIGN.md section 5).

TTFT targets grow with the prompt: a fixed part plus a per-prompt-token part, as SLOs-Serve sets
prefill SLOs relative to the prefill's own length.

Source: DistServe (Zhong et al., OSDI 2024), section 2 -- SLO attainment is the fraction of
requests whose TTFT and TPOT both meet their targets.
Source: SLOs-Serve (Chen et al., 2025), section 5.1 -- per-scenario SLOs (chatbot, coding,
summarization) with prefill targets proportional to prompt length.

The classes are configuration: ``load_slo_config(path)`` reads a YAML file whose classes are
merged field by field over the built-in defaults (``configs/slo_classes.yaml`` spells the
defaults out). The same file names tenants (`TenantPolicy`): the regions that may serve a
tenant's requests (data residency), its tier (what happens to its requests when no region
can meet their SLO) and its default priority. A request's priority (vLLM's convention: lower =
more urgent) is its own ``priority`` if it sets one, else its tenant's, else its class's.
Example::

    default_class: chat
    classes:
      chat: {tpot_ms: 80}            # overrides one field of the built-in chat class
      tool-calling:                  # a new class
        ttft_base_ms: 300
        ttft_per_prompt_token_ms: 0.1
        tpot_ms: 50
    tenants:
      acme-eu: {allowed_regions: [frankfurt]}     # served in Frankfurt only
      nightly-jobs: {on_infeasible: best_effort, priority: 2}  # never refused; queued
                                                             # behind more urgent work
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_SLO_CLASS",
    "DEFAULT_SLO_CLASSES",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "SloClass",
    "SloConfig",
    "SloConfigError",
    "TenantPolicy",
    "load_slo_classes",
    "load_slo_config",
]

#: Name of the class used when a request names none.
DEFAULT_SLO_CLASS = "chat"

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

#: Range of priorities (the ``int32`` of ``GenerateRequest.priority``); lower = more urgent.
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1


class SloConfigError(ValueError):
    """An SLO configuration (file or values) is invalid; the message names the field."""


class SloClass(BaseModel):
    """Latency targets of one class of requests.

    Attributes:
        name: Class name, e.g. ``"chat"`` (letters, digits, ``.``, ``_``, ``-``; at most 64).
        ttft_base_ms: Fixed part of the TTFT target in milliseconds; ``None`` = no TTFT target.
        ttft_per_prompt_token_ms: Part of the TTFT target per prompt token, in milliseconds per
            token (>= 0). Ignored when ``ttft_base_ms`` is ``None``.
        tpot_ms: Target of the mean time per output token after the first, in milliseconds;
            ``None`` = no TPOT target.
        e2e_ms: Target of the end-to-end latency in milliseconds; ``None`` = no E2E target.
        default_output_tokens: Output length in tokens the scheduler assumes when a request
            gives no hint (``expected_output_tokens``) and it has not yet seen enough completed
            requests of the class to use their learned quantile
            (`slomesh.scheduler.output_length`).
        on_infeasible: What the scheduler does when no placement is predicted to meet the SLO:
            ``"refuse"`` (RESOURCE_EXHAUSTED with a retry hint; latency tiers) or
            ``"best_effort"``: place it where it does not push requests already running past
            their TPOT, else wait in the scheduler's best-effort queue, at most the policy's
            ``best_effort_max_wait_ms``, then go to the lowest predicted TTFT).
        priority: Default urgency of the class's requests, vLLM's convention: lower = more
            urgent (a request's own ``priority``, then its tenant's, take precedence). The
            placement policy admits less urgent requests with a tighter SLO margin (headroom
            kept for more urgent ones) and dispatches queued best-effort requests by priority,
            then arrival.

    At least one of ``ttft_base_ms``, ``tpot_ms`` and ``e2e_ms`` must be set. Fields may be
    given positionally in the order above, e.g. ``SloClass("chat", 500, 0.25, 100, None)``.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) a value is out of range; the error names
            the field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME_PATTERN)
    ttft_base_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    ttft_per_prompt_token_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    tpot_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    e2e_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    default_output_tokens: int = Field(default=256, ge=1, le=1_000_000)
    on_infeasible: Literal["refuse", "best_effort"] = "refuse"
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"SloClass takes at most {len(names)} positional arguments")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"SloClass got multiple values for {name!r}")
            kwargs[name] = value
        super().__init__(**kwargs)

    @model_validator(mode="after")
    def _has_a_target(self) -> SloClass:
        if self.ttft_base_ms is None and self.tpot_ms is None and self.e2e_ms is None:
            raise ValueError(
                f"SLO class {self.name!r}: at least one of ttft_base_ms, tpot_ms, e2e_ms "
                "must be set"
            )
        return self

    def ttft_target_ms(self, prompt_tokens: int) -> float:
        """TTFT target for a prompt of ``prompt_tokens`` tokens.

        Args:
            prompt_tokens: Prompt length in tokens (>= 0).

        Returns:
            ``ttft_base_ms + ttft_per_prompt_token_ms * prompt_tokens`` in milliseconds, or
            ``math.inf`` when the class has no TTFT target.
        """
        if self.ttft_base_ms is None:
            return math.inf
        return self.ttft_base_ms + self.ttft_per_prompt_token_ms * max(0, prompt_tokens)

    def tpot_target_ms(self) -> float:
        """TPOT target in milliseconds, ``math.inf`` when the class has none."""
        return math.inf if self.tpot_ms is None else self.tpot_ms

    def e2e_target_ms(self) -> float:
        """E2E target in milliseconds, ``math.inf`` when the class has none."""
        return math.inf if self.e2e_ms is None else self.e2e_ms

    def attained(self, ttft_ms: float, tpot_ms: float, e2e_ms: float, prompt_tokens: int) -> bool:
        """Whether one finished request met this class's SLO.

        Every target the class sets must be met: TTFT <= the TTFT target for the prompt length,
        mean TPOT <= the TPOT target, E2E <= the E2E target. A request with one output token has
        no TPOT; pass ``tpot_ms=0`` for it.

        Source: DistServe (Zhong et al., OSDI 2024), section 2 (SLO attainment).

        Args:
            ttft_ms: Measured time to first token, client side, in milliseconds.
            tpot_ms: Measured mean time per output token after the first, in milliseconds.
            e2e_ms: Measured end-to-end latency, client side, in milliseconds.
            prompt_tokens: Prompt length in tokens.

        Returns:
            True when all of the class's targets are met. NaN measurements never attain.
        """
        if any(math.isnan(x) for x in (ttft_ms, tpot_ms, e2e_ms)):
            return False
        return (
            ttft_ms <= self.ttft_target_ms(prompt_tokens)
            and tpot_ms <= self.tpot_target_ms()
            and e2e_ms <= self.e2e_target_ms()
        )


#: The built-in classes (DESIGN.md section 5 table), as field dicts keyed by class name.
DEFAULT_SLO_CLASSES: dict[str, dict[str, Any]] = {
    "chat": {
        "ttft_base_ms": 500.0,
        "ttft_per_prompt_token_ms": 0.25,
        "tpot_ms": 100.0,
        "e2e_ms": None,
        "default_output_tokens": 256,
        "on_infeasible": "refuse",
        "priority": 0,
    },
    "coding": {
        "ttft_base_ms": 500.0,
        "ttft_per_prompt_token_ms": 0.25,
        "tpot_ms": 50.0,
        "e2e_ms": None,
        "default_output_tokens": 256,
        "on_infeasible": "refuse",
        "priority": 0,
    },
    "summarization": {
        "ttft_base_ms": 1000.0,
        "ttft_per_prompt_token_ms": 0.5,
        "tpot_ms": 150.0,
        "e2e_ms": None,
        "default_output_tokens": 128,
        "on_infeasible": "refuse",
        "priority": 0,
    },
    "batch": {
        "ttft_base_ms": None,
        "ttft_per_prompt_token_ms": 0.0,
        "tpot_ms": None,
        "e2e_ms": 60_000.0,
        "default_output_tokens": 512,
        "on_infeasible": "best_effort",
        "priority": 0,
    },
}


class TenantPolicy(BaseModel):
    """What one tenant's requests may use, and how they are admitted.

    Attributes:
        name: Tenant name, as requests carry it in ``tenant``.
        allowed_regions: Regions that may serve the tenant's requests (data residency); empty
            = any region. Every placement policy honours it as a hard constraint; a request no
            allowed region can serve is UNAVAILABLE.
        on_infeasible: The tenant's tier: overrides its requests' SLO class ``on_infeasible``
            (``"refuse"`` or ``"best_effort"``); ``None`` = the class's.
        priority: Default priority of the tenant's requests (lower = more urgent), over its
            requests' SLO class default; a request's own ``priority`` wins. ``None`` = the
            class's.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) a bad name or value; the error names it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME_PATTERN)
    allowed_regions: frozenset[str] = frozenset()
    on_infeasible: Literal["refuse", "best_effort"] | None = None
    priority: int | None = Field(default=None, ge=PRIORITY_MIN, le=PRIORITY_MAX)


class SloConfig(BaseModel):
    """A set of SLO classes, the default class, and the tenants' policies.

    Attributes:
        classes: Class name -> class.
        default_class: Name of the class used for requests that name none; must be in
            ``classes``.
        tenants: Tenant name -> policy. A request of a tenant not listed (or of none) has no
            region constraint and its class's ``on_infeasible``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: dict[str, SloClass]
    default_class: str = DEFAULT_SLO_CLASS
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _names_match(cls, classes: dict[str, SloClass]) -> dict[str, SloClass]:
        if not classes:
            raise ValueError("at least one SLO class is required")
        for key, slo in classes.items():
            if key != slo.name:
                raise ValueError(f"class key {key!r} differs from its name {slo.name!r}")
        return classes

    @model_validator(mode="after")
    def _default_known(self) -> SloConfig:
        if self.default_class not in self.classes:
            raise ValueError(
                f"default_class {self.default_class!r} is not one of {sorted(self.classes)}"
            )
        return self


def _format_validation_error(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        field = f"{prefix}.{loc}" if loc else prefix
        parts.append(f"{field}: {e['msg']}")
    return "; ".join(parts)


def _build_class(name: str, fields: dict[str, Any]) -> SloClass:
    try:
        return SloClass(name=name, **fields)
    except ValidationError as err:
        raise SloConfigError(_format_validation_error(err, f"classes.{name}")) from None
    except TypeError as err:  # unexpected keyword
        raise SloConfigError(f"classes.{name}: {err}") from None


def load_slo_config(path: str | Path | None = None) -> SloConfig:
    """Load SLO classes from a YAML file merged over the built-in defaults.

    File format: a mapping with optional ``default_class`` (str), ``classes`` (mapping of
    class name -> mapping of ``SloClass`` fields) and ``tenants`` (mapping of tenant name ->
    mapping of ``TenantPolicy`` fields). A class that exists among the defaults is
    overridden field by field (``null`` removes a target); a new class must give its fields in
    full (missing fields take the ``SloClass`` defaults). ``replace_defaults: true`` drops the
    built-in classes first.

    Args:
        path: YAML file; ``None`` = the built-in defaults only.

    Returns:
        The validated configuration.

    Raises:
        SloConfigError: The file is missing, is not valid YAML, or a value is invalid; the
            message names the offending field, e.g. ``classes.chat.tpot_ms: ...``.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise SloConfigError(f"cannot read SLO config {path}: {err}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SloConfigError(f"SLO config {path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SloConfigError(f"SLO config {path}: top level must be a mapping")
        unknown = set(loaded) - {"default_class", "classes", "replace_defaults", "tenants"}
        if unknown:
            raise SloConfigError(f"{min(unknown)}: unknown key in SLO config {path}")
        raw = loaded

    file_classes = raw.get("classes") or {}
    if not isinstance(file_classes, dict):
        raise SloConfigError("classes: must be a mapping of class name -> fields")
    replace = raw.get("replace_defaults", False)
    if not isinstance(replace, bool):
        raise SloConfigError("replace_defaults: must be true or false")

    merged: dict[str, dict[str, Any]] = (
        {} if replace else {k: dict(v) for k, v in DEFAULT_SLO_CLASSES.items()}
    )
    for name, fields in file_classes.items():
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            raise SloConfigError(f"classes.{name}: must be a mapping of fields")
        if "name" in fields and fields["name"] != name:
            raise SloConfigError(f"classes.{name}.name: differs from the key {name!r}")
        fields = {k: v for k, v in fields.items() if k != "name"}
        merged[str(name)] = {**merged.get(str(name), {}), **fields}

    classes = {name: _build_class(name, fields) for name, fields in merged.items()}
    default_class = raw.get("default_class", DEFAULT_SLO_CLASS)
    file_tenants = raw.get("tenants") or {}
    if not isinstance(file_tenants, dict):
        raise SloConfigError("tenants: must be a mapping of tenant name -> fields")
    tenants = {}
    for name, fields in file_tenants.items():
        if not isinstance(fields, dict):
            raise SloConfigError(f"tenants.{name}: must be a mapping of fields")
        try:
            tenants[str(name)] = TenantPolicy(name=str(name), **fields)
        except ValidationError as err:
            raise SloConfigError(_format_validation_error(err, f"tenants.{name}")) from None
        except TypeError as err:
            raise SloConfigError(f"tenants.{name}: {err}") from None
    try:
        return SloConfig(classes=classes, default_class=default_class, tenants=tenants)
    except ValidationError as err:
        raise SloConfigError(_format_validation_error(err, "slo_config")) from None


def load_slo_classes(path: str | Path | None = None) -> dict[str, SloClass]:
    """SLO classes by name: the built-in defaults, or a YAML file merged over them.

    See ``load_slo_config`` for the file format and errors.
    """
    return load_slo_config(path).classes
