"""Run one benchmark config in its own process (so that its peak GPU memory is its own) and relay its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def run_config(cmd: list[str], head: dict, timeout: int, log_name: str) -> dict | None:
    """Run `cmd`, print its last JSON line (or an error line that starts with `head`) and return it parsed.

    The child's stderr is appended to `$OUT/<log_name>` on the GPU machine, under a header naming the config."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=timeout)
    except subprocess.TimeoutExpired as err:
        print(json.dumps({**head, "error": f"timed out after {timeout}s",
                          "stderr_tail": (err.stderr or b"").decode(errors="replace")[-600:]}), flush=True)
        return None
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / log_name, "a") as log:
            log.write(f"=== {json.dumps(head)}\n{proc.stderr[-20000:]}\n")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(json.dumps({**head, "error": proc.stderr.strip().splitlines()[-3:]}), flush=True)
        return None
    print(lines[-1], flush=True)
    return json.loads(lines[-1])
