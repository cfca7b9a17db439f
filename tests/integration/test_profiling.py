"""`slomesh profile` against an emulator over real HTTP, each in a process of its own.

The emulator times its steps with the roofline of `slomesh.engine.profiles`, so the fitted
profile must explain its measured points (high R²) and predict the roofline's step times. The
emulator runs an L4 at four times its speed (`time_scale` 0.25, which the profiler reads from
`/slomesh/info` and divides out), with a step budget that holds the largest batch's prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from slomesh.emulator import EmulatorConfig, EmulatorServer
from slomesh.engine.profiles import decode_step_time_s, get_model_spec, get_profile, step_time_s
from slomesh.procs import free_port
from slomesh.profiling import LatencyProfile, SweepConfig

pytestmark = pytest.mark.slow

GPU = "L4"
TIME_SCALE = 0.25
SWEEP = SweepConfig(prompt_tokens=(128, 256, 512, 1536), batch_sizes=(1, 4, 16), repeats=2,
                    output_tokens=16)  # fmt: skip
"""12 points of each kind; every 4th one held out -- (256, 1), (512, 4), (1536, 16) -- spans
the range, so that the held-out R² is not at the mercy of the noise on two close points."""
PREFILL_REL_TOL = 0.10
"""Relative tolerance of prefill times against the roofline: the linear model has no
max(compute, memory) (the 128-token single prefill is memory-bound on an L4), and the
emulator's timed sleeps overshoot by a few % of a step on a loaded 2-core host (5 % seen in
CI). A fit that missed a term of the roofline (the attention pairs) is off by far more."""
REQUEST_PATH_WALL_S = 0.020
"""Allowance for the request path in a fitted TTFT, wall seconds (divided by the time scale
like the measured times): the fitted intercept holds it, 5-7 ms on a quiet 2-core host for
client and emulator on one event loop, JSON of up to 25k prompt ids each way, 11 ms seen in
CI under load."""
DECODE_REL_TOL = 0.03
"""Relative tolerance of decode step times against the roofline."""


@contextlib.contextmanager
def emulator_process(*args: str):
    """An emulator in a process of its own (``python -m slomesh.emulator``), so that its step
    timing does not share this test process's interpreter (its GC, earlier tests' threads).

    Yields:
        (base URL, its ``/slomesh/info``).
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slomesh.emulator", "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/slomesh/info", timeout=1) as resp:
                    info = json.load(resp)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the emulator did not start") from None
                time.sleep(0.1)
        yield url, info
    finally:
        proc.terminate()
        proc.wait(10)


def test_profile_of_the_emulator_matches_its_roofline(tmp_path):
    out = tmp_path / "l4.yaml"
    sweep = [
        "--prompt-tokens", ",".join(map(str, SWEEP.prompt_tokens)),
        "--batch-sizes", ",".join(map(str, SWEEP.batch_sizes)),
        "--repeats", str(SWEEP.repeats), "--output-tokens", str(SWEEP.output_tokens),
    ]  # fmt: skip
    with emulator_process("--gpu-type", GPU, "--time-scale", str(TIME_SCALE),
                          "--max-num-batched-tokens", "32768") as (url, info):
        # The profiler in a process of its own too, as a user runs it.
        proc = subprocess.run(
            [sys.executable, "-m", "slomesh.cli", "profile", "--endpoint", url, "--out",
             str(out), "--gpu-type", GPU, "--no-progress", *sweep],
            capture_output=True, text=True, timeout=240, check=False,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = LatencyProfile.load(out)

    gpu, model = get_profile(GPU), get_model_spec(info["model"])
    assert profile.model == info["served_model_name"] and profile.gpu_type == GPU
    assert profile.time_scale == TIME_SCALE and profile.block_size == 16
    assert profile.max_model_len == info["max_model_len"]
    assert [(p.uncached_tokens, p.batch_size) for p in profile.prefill.points] == [
        (n, k) for n in SWEEP.prompt_tokens for k in SWEEP.batch_sizes
    ]
    assert len(profile.decode.points) == 12
    # The emulator exports vLLM's inter-token latency histogram: decode steps are timed inside
    # it (a probe whose window the scrapes missed on a loaded host falls back to the client).
    engine_timed = sum(p.engine_timed_probes for p in profile.decode.points)
    assert engine_timed >= len(profile.decode.points) * SWEEP.repeats // 2

    prefill_q, decode_q = profile.prefill.quality, profile.decode.quality
    assert (prefill_q.train_points, prefill_q.held_out_points) == (9, 3)
    assert prefill_q.r2_train > 0.99 and prefill_q.r2_held_out > 0.99
    # An emulated L4's decode steps differ by a few % across the sweep (reading the weights
    # dominates them), so their R² swings with the probes' jitter on a loaded 2-core host (0.41
    # to 0.97 seen in CI); the fit's accuracy at every point, below, is the stable check.
    assert decode_q.r2_train is not None and decode_q.r2_held_out is not None
    assert (decode_q.train_points, decode_q.held_out_points) == (9, 3)

    # Fitted times against the roofline's: prefill at every measured shape (a single probe may
    # be late by more than the allowance on a loaded host; the fit averages that out).
    allowance_ms = REQUEST_PATH_WALL_S / TIME_SCALE * 1000
    for p in profile.prefill.points:
        roofline_ms = 1000 * step_time_s(
            gpu, model, p.batch_tokens, 0, p.batch_tokens, attention_pairs=p.attention_pairs
        )
        fitted_ms = profile.prefill_ms(p.uncached_tokens, 0, p.batch_tokens)
        assert fitted_ms == pytest.approx(roofline_ms, rel=PREFILL_REL_TOL, abs=allowance_ms), p
    for p in profile.decode.points:
        roofline_ms = 1000 * decode_step_time_s(
            gpu, model, p.batch_size, p.context_tokens / p.batch_size
        )
        # The steady window's step time at its mean context: measured points hold it too.
        for ms in (p.tpot_ms, profile.decode_step_ms(p.batch_size, p.context_tokens)):
            assert ms == pytest.approx(roofline_ms, rel=DECODE_REL_TOL), p

    # The coefficients carry the roofline's physics: GEMM time per token, weights read per step.
    per_token_ms = 1000 * 2 * model.num_params / (gpu.peak_flops * gpu.compute_efficiency)
    assert profile.prefill.coefficients.per_batch_token_ms == pytest.approx(per_token_ms, rel=0.05)
    weights_ms = 1000 * (
        model.weight_bytes / (gpu.mem_bandwidth_bytes_per_s * gpu.memory_efficiency)
        + gpu.step_overhead_s
    )
    assert profile.decode.coefficients.intercept_ms == pytest.approx(weights_ms, rel=0.03)

    assert LatencyProfile.load(profile.save(tmp_path / "l4.yaml")) == profile


async def test_cli_writes_a_profile_of_the_emulator(tmp_path):
    server = EmulatorServer(EmulatorConfig(port=0, gpu_type="H100"))
    await server.start()
    out = tmp_path / "h100.yaml"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "slomesh.cli", "profile", "--endpoint", server.url,
            "--out", str(out), "--prompt-tokens", "256,512", "--batch-sizes", "1,2,4",
            "--repeats", "1", "--output-tokens", "4", "--gpu-type", "h100-emulated",
            "--no-progress",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await server.stop()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "R² held out" in stdout.decode() and "prefill.per_batch_token_ms" in stdout.decode()
    assert f"profile written to {out}" in stderr.decode()
    profile = LatencyProfile.load(out)
    assert profile.gpu_type == "h100-emulated" and profile.endpoint == server.url
    assert len(profile.prefill.points) == len(profile.decode.points) == 6
    assert profile.sweep.prompt_tokens == (256, 512) and profile.sweep.repeats == 1
