"""Validation of incoming `GenerateRequest`s.

Every check raises `RequestValidationError(field, message)`; the global scheduler maps it to
gRPC INVALID_ARGUMENT with a message that starts with the field name, e.g.
``max_tokens: prompt (7000 tokens) + max_tokens (2000) exceeds max_model_len 8192 of model m``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from slomesh.slo import SloClass, SloConfig, TenantPolicy
from slomesh.v1 import scheduler_pb2

if TYPE_CHECKING:
    from slomesh.scheduler.view import ClusterView

__all__ = [
    "MAX_TOKEN_ID",
    "REQUEST_ID_PATTERN",
    "TOKENS_PER_WORD",
    "RequestValidationError",
    "ValidatedRequest",
    "estimate_text_tokens",
    "validate_for_view",
    "validate_request",
]

#: Allowed request ids: letters, digits, ``.``, ``_``, ``:`` and ``-``; 1 to 128 characters.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: Token ids must be below this (engines keep token ids in signed 32-bit integers).
MAX_TOKEN_ID = 2**31 - 1

#: Tokens per whitespace-separated word assumed for text prompts (English text with a BPE
#: tokenizer of the Llama/GPT family: 100 tokens are about 75 words).
TOKENS_PER_WORD = 4.0 / 3.0

#: Upper bound of the characters-per-token ratio used as a second estimate for text without
#: spaces (code, CJK): one token per 4 characters.
CHARS_PER_TOKEN = 4.0


class RequestValidationError(ValueError):
    """A request is invalid; maps to gRPC INVALID_ARGUMENT.

    Attributes:
        field: The offending field of `GenerateRequest` (e.g. ``"max_tokens"``).
        message: What is wrong with it.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    """A request that passed validation, with the values the scheduler works with.

    Attributes:
        request_id: The client's id, or a generated one (32 hex characters).
        model: Model name, known to the mesh.
        prompt_token_ids: Prompt token ids, a read-only ``uint32`` numpy array of shape
            [prompt_tokens] (empty for a text prompt): converting the protobuf field costs
            microseconds this way, where a Python list of a 32k-token prompt costs a
            millisecond on the placement path. Call ``.tolist()`` where a list is needed.
        prompt_text: Prompt text; empty for a token-id prompt.
        prompt_tokens: Prompt length in tokens (estimated for a text prompt).
        prompt_tokens_estimated: True when `prompt_tokens` is an estimate (text prompt).
        max_tokens: Output tokens to generate at most.
        ignore_eos: Keep generating past EOS.
        slo: The request's SLO class.
        origin_region: Region the client sends from.
        tenant: Tenant name (may be empty).
        expected_output_tokens: The client's output-length hint in tokens; 0 = none.
        allowed_regions: Regions that may serve the request (its tenant's data residency);
            empty = any region.
        on_infeasible: What happens when no region can meet the SLO: the tenant's tier if it
            sets one, else the SLO class's (``"refuse"`` or ``"best_effort"``).
        priority: Urgency, lower = more urgent (vLLM's convention): the request's own
            ``priority`` if set, else its tenant's default, else its SLO class's.
    """

    request_id: str
    model: str
    prompt_token_ids: np.ndarray
    prompt_text: str
    prompt_tokens: int
    prompt_tokens_estimated: bool
    max_tokens: int
    ignore_eos: bool
    slo: SloClass
    origin_region: str
    tenant: str
    expected_output_tokens: int
    allowed_regions: frozenset[str]
    on_infeasible: str
    priority: int = 0

    @property
    def slo_class(self) -> str:
        """Name of the request's SLO class."""
        return self.slo.name


def estimate_text_tokens(text: str) -> int:
    """Estimated token count of a text prompt (no tokenizer at the scheduler).

    The larger of ``ceil(words * TOKENS_PER_WORD)`` (about 1.33 tokens per whitespace-separated
    word, typical of English with Llama/GPT BPE tokenizers) and ``ceil(chars / 4)`` (which keeps
    text without spaces, such as code or CJK, from being underestimated).

    Args:
        text: The prompt.

    Returns:
        Estimated prompt tokens, >= 1 for non-empty text, 0 for empty text.
    """
    if not text:
        return 0
    words = len(text.split())
    return max(1, math.ceil(words * TOKENS_PER_WORD), math.ceil(len(text) / CHARS_PER_TOKEN))


def validate_for_view(
    request: scheduler_pb2.GenerateRequest,
    view: ClusterView,
    slo: SloConfig,
    default_origin_region: str | None,
) -> ValidatedRequest:
    """`validate_request` against what `view` knows (models, regions) and `slo`'s classes and
    tenants: the validation of the live scheduler and of the simulator's, alike.

    Raises:
        RequestValidationError: as `validate_request`.
    """
    return validate_request(
        request,
        models=view.known_models(),
        slo_classes=slo.classes,
        default_slo_class=slo.default_class,
        regions=view.known_region_names(),
        default_origin_region=default_origin_region,
        tenants=slo.tenants,
    )


def validate_request(
    request: scheduler_pb2.GenerateRequest,
    *,
    models: Mapping[str, int],
    slo_classes: Mapping[str, SloClass],
    default_slo_class: str,
    regions: Collection[str],
    default_origin_region: str | None = None,
    tenants: Mapping[str, TenantPolicy] | None = None,
) -> ValidatedRequest:
    """Validates a `GenerateRequest` against what the mesh serves.

    Args:
        request: The incoming request.
        models: Model name -> max_model_len (tokens of prompt + output the model accepts).
        slo_classes: SLO class name -> class.
        default_slo_class: Class used when the request names none.
        regions: Known region names (origin regions a client may send from).
        default_origin_region: Origin used when the request names none (the scheduler
            replica's own region); ``None`` makes `origin_region` required.
        tenants: Tenant name -> policy (region constraint, tier, default priority); a tenant
            not listed has none of them.

    Returns:
        The validated request.

    Raises:
        RequestValidationError: (gRPC INVALID_ARGUMENT) naming the field: a malformed
            `request_id`; an unknown `model`; neither or both of `prompt_token_ids` and
            `prompt_text`; an empty prompt; a token id above `MAX_TOKEN_ID`; `max_tokens` of 0
            or a prompt plus `max_tokens` over the model's max_model_len; an unknown
            `slo_class`; an unknown or missing `origin_region`.
    """
    request_id = request.request_id
    if request_id:
        if not REQUEST_ID_PATTERN.match(request_id):
            raise RequestValidationError(
                "request_id",
                f"must match {REQUEST_ID_PATTERN.pattern} (got {request_id[:40]!r})",
            )
    else:
        request_id = uuid.uuid4().hex

    if not request.model:
        raise RequestValidationError("model", "required")
    max_model_len = models.get(request.model)
    if max_model_len is None:
        raise RequestValidationError(
            "model", f"unknown model {request.model[:100]!r} (served: {sorted(models)})"
        )

    # One copy into a numpy array (the protobuf field's buffer protocol: microseconds).
    token_ids = np.asarray(request.prompt_token_ids, dtype=np.uint32)
    token_ids.flags.writeable = False
    text = request.prompt_text
    if token_ids.size and text:
        raise RequestValidationError(
            "prompt_token_ids", "set exactly one of prompt_token_ids and prompt_text, not both"
        )
    if not token_ids.size and not text:
        raise RequestValidationError(
            "prompt_token_ids", "empty prompt: set one of prompt_token_ids and prompt_text"
        )
    if text:
        if not text.strip():
            raise RequestValidationError("prompt_text", "empty prompt (only whitespace)")
        prompt_tokens = estimate_text_tokens(text)
        estimated = True
    else:
        if int(token_ids.max()) > MAX_TOKEN_ID:
            bad = int(np.argmax(token_ids > MAX_TOKEN_ID))
            raise RequestValidationError(
                "prompt_token_ids",
                f"token id {token_ids[bad]} at position {bad} exceeds {MAX_TOKEN_ID}",
            )
        prompt_tokens = len(token_ids)
        estimated = False

    if request.max_tokens <= 0:
        raise RequestValidationError("max_tokens", "must be >= 1")
    if prompt_tokens >= max_model_len:
        raise RequestValidationError(
            "prompt_token_ids" if not estimated else "prompt_text",
            f"prompt of {prompt_tokens} tokens{' (estimated)' if estimated else ''} does not "
            f"fit max_model_len {max_model_len} of model {request.model!r}",
        )
    if prompt_tokens + request.max_tokens > max_model_len:
        raise RequestValidationError(
            "max_tokens",
            f"prompt ({prompt_tokens} tokens{', estimated' if estimated else ''}) + max_tokens "
            f"({request.max_tokens}) exceeds max_model_len {max_model_len} of model "
            f"{request.model!r}",
        )

    class_name = request.slo_class or default_slo_class
    slo = slo_classes.get(class_name)
    if slo is None:
        raise RequestValidationError(
            "slo_class", f"unknown SLO class {class_name[:64]!r} (known: {sorted(slo_classes)})"
        )

    origin = request.origin_region or default_origin_region
    if not origin:
        raise RequestValidationError(
            "origin_region", "required (this scheduler replica has no region of its own)"
        )
    if origin not in regions:
        raise RequestValidationError(
            "origin_region", f"unknown region {origin[:64]!r} (known: {sorted(regions)})"
        )

    if len(request.tenant) > 128:
        raise RequestValidationError("tenant", "at most 128 characters")
    tenant = (tenants or {}).get(request.tenant) if request.tenant else None
    if request.HasField("priority"):
        priority = request.priority
    elif tenant is not None and tenant.priority is not None:
        priority = tenant.priority
    else:
        priority = slo.priority
    return ValidatedRequest(
        request_id=request_id,
        model=request.model,
        prompt_token_ids=token_ids,
        prompt_text=text,
        prompt_tokens=prompt_tokens,
        prompt_tokens_estimated=estimated,
        max_tokens=request.max_tokens,
        ignore_eos=request.ignore_eos,
        slo=slo,
        origin_region=origin,
        tenant=request.tenant,
        expected_output_tokens=request.expected_output_tokens,
        allowed_regions=tenant.allowed_regions if tenant else frozenset(),
        on_infeasible=(tenant.on_infeasible if tenant else None) or slo.on_infeasible,
        priority=priority,
    )
