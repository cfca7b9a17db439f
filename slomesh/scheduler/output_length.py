"""Online output-length predictor: an empirical distribution per (model, SLO class).

Placement needs the output length ``N_out`` of a request before it runs (its decode time
``D_q = N_out x TPOT``, its KV footprint and queue share; DESIGN.md section 2), but a real client
does not know it. `OutputLengthPredictor` learns it from what the mesh has served: for each
(model name, SLO class name) it keeps the output lengths, in tokens, of the last ``window``
completed requests, and placement takes a configurable quantile of them
(`PredictorConfig.output_length_quantile`, 0.5 = the median) rather than their mean, which
the long tail of output lengths drags upward.

Drift: a **sliding window** of the last ``window`` completions, not exponential decay, because

- its quantiles are the exact empirical quantiles of a well-defined population (the last
  ``window`` completions of the class), so an answer can be checked by hand;
- an observation stops counting after exactly ``window`` newer ones (bounded staleness), while
  exponential decay never fully forgets;
- it maps one to one onto a capped Redis list (``LPUSH`` + ``LTRIM``), so scheduler replicas
  and a restarted scheduler share the same window without merging decayed float weights
  (see ``services/global_scheduler/ledger.py``).

How fast a shift is followed: if every new length is above every old one, the q-quantile
moves into the new distribution once more than ``(1 - q) x window`` new completions have
arrived (``q x window`` when every new length is below), and the window holds only the new
distribution after ``window`` completions.

Cost: the window is kept both in arrival order (a deque, to evict the oldest) and sorted (a
list kept sorted with `bisect`). `observe` is O(log window) comparisons plus one memmove of
at most ``window`` pointers (about a microsecond for 1000); a quantile is one index into the
sorted list, O(1), so the placement hot path never sorts.

Quantile definition: the inverted empirical CDF (Hyndman and Fan's definition 1, numpy's
``method="inverted_cdf"``): the smallest observed length ``x`` with at least ``q`` of the
window ``<= x``, i.e. the ``ceil(q x n)``-th smallest of ``n``.

The prediction rule (`predict`) and what it may read: the client's hint
(``expected_output_tokens``) is the client's own estimate and always usable; ``max_tokens``
is an upper bound a real client picks without knowing the length, so it caps the guess.
Under ``ignore_eos`` the engine generates exactly ``max_tokens`` tokens: benchmark replays
(`slomesh.replay`, the simulator) send each trace request that way with ``max_tokens`` = its
true output length, so reading ``max_tokens`` -- even as a cap -- would leak the true length.
Only an oracle (`PredictorConfig.use_true_output_length`) does. Learning from *completed*
requests leaks nothing: the scheduler sees a length only after the request has ended.

Source: Hyndman and Fan, "Sample quantiles in statistical packages", The American
Statistician 50(4), 1996 (definition 1, the inverted empirical CDF).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slomesh.scheduler.predictor import PredictorConfig
    from slomesh.scheduler.validation import ValidatedRequest

__all__ = ["DEFAULT_OUTPUT_LENGTH_WINDOW", "OutputLengthPredictor"]

#: Completions kept per (model, SLO class). The median of 1000 samples lies within about
#: +-3 percentile points of the true median (two binomial standard errors,
#: 2 x sqrt(0.25 / 1000) ~ 0.032), and a shift of the distribution is followed after about
#: 500 completions of the class (module docstring).
DEFAULT_OUTPUT_LENGTH_WINDOW = 1000


@dataclass(slots=True)
class _Window:
    """The last ``window`` output lengths of one (model, class), in arrival and sorted order."""

    recent: deque[int] = field(default_factory=deque)
    ordered: list[int] = field(default_factory=list)


class OutputLengthPredictor:
    """Output lengths of completed requests per (model, SLO class), and `predict` (module
    docstring).

    Not thread-safe; the scheduler uses it from one asyncio loop, the simulator from one
    thread.

    Args:
        window: Completions kept per (model, class), >= 1.

    Raises:
        ValueError: ``window`` < 1.
    """

    def __init__(self, window: int = DEFAULT_OUTPUT_LENGTH_WINDOW):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {window!r}")
        self.window = window
        self._windows: dict[tuple[str, str], _Window] = {}

    def observe(self, model: str, slo_class: str, output_tokens: int) -> None:
        """Adds the output length of a completed request; the oldest beyond `window` goes.

        Args:
            model: Model name the request ran on.
            slo_class: Its SLO class name.
            output_tokens: Tokens it generated (``usage.completion_tokens``), >= 1.

        Raises:
            ValueError: ``output_tokens`` < 1 (a request that produced nothing has no length
                to learn; callers skip it).
        """
        if output_tokens < 1:
            raise ValueError(f"output_tokens: must be >= 1, got {output_tokens}")
        n = int(output_tokens)
        win = self._windows.get((model, slo_class))
        if win is None:
            win = self._windows[(model, slo_class)] = _Window()
        if len(win.recent) >= self.window:
            oldest = win.recent.popleft()
            del win.ordered[bisect.bisect_left(win.ordered, oldest)]
        win.recent.append(n)
        bisect.insort(win.ordered, n)

    def observe_many(self, model: str, slo_class: str, output_tokens: Iterable[int]) -> None:
        """`observe` for each length in order, oldest first (e.g. a window loaded from Redis).

        Raises:
            ValueError: a length < 1 (those before it are kept).
        """
        for n in output_tokens:
            self.observe(model, slo_class, n)

    def count(self, model: str, slo_class: str) -> int:
        """Completions in the window of (model, class), in [0, `window`]."""
        win = self._windows.get((model, slo_class))
        return len(win.recent) if win is not None else 0

    def samples(self, model: str, slo_class: str) -> list[int]:
        """The window of (model, class) in arrival order, oldest first (a copy), in tokens."""
        win = self._windows.get((model, slo_class))
        return list(win.recent) if win is not None else []

    def keys(self) -> list[tuple[str, str]]:
        """Every (model, SLO class) with at least one observation."""
        return list(self._windows)

    def quantile(self, model: str, slo_class: str, q: float, min_samples: int = 1) -> int | None:
        """The ``q``-quantile of the window of (model, class), in tokens (O(1)).

        Args:
            model: Model name.
            slo_class: SLO class name.
            q: Quantile in (0, 1]; the smallest observed ``x`` with a fraction >= ``q`` of the
                window at or below it (inverted empirical CDF).
            min_samples: Observations required; with fewer, ``None``. Capped at `window` (a
                full window always answers).

        Returns:
            An observed output length, or ``None`` before ``min(min_samples, window)``
            observations.

        Raises:
            ValueError: ``q`` outside (0, 1].
        """
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q: must be in (0, 1], got {q}")
        win = self._windows.get((model, slo_class))
        if win is None:
            return None
        ordered = win.ordered
        n = len(ordered)
        if n < min(min_samples, self.window) or n == 0:
            return None
        # ceil(q * n) computed with a tolerance, so that e.g. q = 0.28, n = 25 (q * n =
        # 7.000000000000001 in binary floating point) is the 7th value, not the 8th.
        rank = min(n, max(1, math.ceil(q * n - 1e-9)))
        return ordered[rank - 1]

    def predict(self, request: ValidatedRequest, config: PredictorConfig) -> int:
        """Predicted output length ``N_out`` of a request, in tokens (>= 1).

        The rule, first match wins:

        1. oracle: ``config.use_true_output_length`` and ``request.ignore_eos`` ->
           ``max_tokens`` (the true length);
        2. the client's hint ``expected_output_tokens`` if > 0;
        3. the ``config.output_length_quantile`` of the request's (model, SLO class) window
           once it holds ``config.output_length_min_samples`` completions;
        4. the SLO class's ``default_output_tokens``.

        Steps 2-4 are capped at ``max_tokens`` unless the request is ``ignore_eos``, where
        ``max_tokens`` is the true length and is not read at all (module docstring).

        Args:
            request: The validated request.
            config: The policy's predictor knobs.

        Returns:
            Tokens, >= 1.
        """
        max_tokens = request.max_tokens
        if request.ignore_eos and config.use_true_output_length:
            return max(1, max_tokens)
        guess = request.expected_output_tokens
        if guess <= 0:
            learned = self.quantile(
                request.model,
                request.slo.name,
                config.output_length_quantile,
                config.output_length_min_samples,
            )
            guess = learned if learned is not None else request.slo.default_output_tokens
        if request.ignore_eos:
            return max(1, guess)
        return max(1, min(guess, max_tokens))
