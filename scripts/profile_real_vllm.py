"""Profile a real vLLM on CPU: start it as the integration tests do, run `slomesh profile`.

    .venv/bin/python scripts/profile_real_vllm.py --out PROFILE.yaml [slomesh profile flags]

Starts `tests.vllm_server.VllmServer` (the tiny random Llama of `configs/vllm/tiny-llama`,
vLLM from `scripts/setup_vllm_env.sh`, see ../shared/REAL_VLLM.md; 60-90 s), runs
`slomesh profile --endpoint <it> --gpu-type cpu` with the other arguments, prints the host's
load average before and after (the sweep's times are only as steady as the host), and stops
the server. Exits with `slomesh profile`'s status.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slomesh.profiling import main as profile_main
from tests.vllm_server import VllmServer, find_vllm_python


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv: list[str]) -> int:
    """Start the server, profile it with `argv` added to the profile's flags, stop it."""
    server = VllmServer(find_vllm_python())
    started = time.monotonic()
    server.start(timeout_s=300.0)
    print(f"vLLM ready at {server.url} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    try:
        print(f"before: {_load()}", file=sys.stderr)
        started = time.monotonic()
        rc = profile_main(["--endpoint", server.url, "--gpu-type", "cpu", *argv])
        print(
            f"after: {_load()}; slomesh profile took {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        return rc
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
