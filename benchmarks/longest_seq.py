"""The longest sequence (batch 1) that trains one step on this GPU, found by bisection: ours or Unsloth's.

    python3 benchmarks/longest_seq.py --system ours --lo 131072 --hi 524288
    python3 benchmarks/longest_seq.py --system unsloth --lo 131072 --hi 524288   (.peers carried, ANCHORS.md)

Each try is its own process (so that an out-of-memory leaves nothing behind) running ONE training step, the
compiling one for us (`train_step.py --steps 0`), at `seq` tokens; a try trains if it exits 0 and prints its
JSON line. Lengths are multiples of `--granularity`. Prints one JSON line per try (tokens, ok, seconds, the
child's peak host RSS, our GPU peak and compile seconds) and one summary line: the longest length that trained,
the shortest that did not. A try that outlives `--timeout` counts as not training (say so when you report it).
Issue 15 asks for ours >= 1.5x Unsloth's, both found here back to back on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from train_step import PEERS, peers_env  # this folder is on sys.path when run as a script

HERE = Path(__file__).resolve().parent

# Unsloth: one step of torch_peers.py's workload (its load(), AdamW on the LoRA parameters), nothing timed.
UNSLOTH_ONE_STEP = r"""
import json, os, sys, tempfile, torch
sys.path.insert(0, sys.argv[1])
import torch_peers as tp
shape, seq = sys.argv[2], int(sys.argv[3])
path = os.path.join(tempfile.gettempdir(), f"ckpt-{shape}")
tp.make_checkpoint(shape, path)
torch.cuda.reset_peak_memory_stats()
model = tp.load("unsloth", path, 16, "unsloth", max(8192, seq), tp.targets_for(shape))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(4, model.config.vocab_size, (1, seq), device="cuda")
out = model(input_ids=ids, labels=ids)
out.loss.backward()
opt.step()
torch.cuda.synchronize()
print(json.dumps({"system": "unsloth", "seq": seq, "loss": float(out.loss),
                  "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
"""


def try_length(system: str, shape: str, seq: int, timeout: int, mlp_tile_tokens: int) -> dict:
    if system == "ours":
        cmd = [sys.executable, str(HERE / "train_step.py"), "--one", "--shape", shape, "--batch", "1", "--seq",
               str(seq), "--gc", "unsloth", "--steps", "0", "--mlp-tile-tokens", str(mlp_tile_tokens)]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-c", UNSLOTH_ONE_STEP, str(PEERS), shape, str(seq)]
        env = peers_env()
    t0 = time.perf_counter()
    killed = []
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)

        def kill():
            killed.append(True)
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it had just ended
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak host RSS
        except BaseException:  # interrupted: leave no child running
            kill()
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    timed_out = bool(killed) and os.WIFSIGNALED(status)  # a kill that came after a normal exit does not count
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    row = {"bench": "longest_seq_try", "system": system, "shape": shape, "seq": seq,
           "ok": proc.returncode == 0 and bool(lines) and not timed_out,
           "seconds": round(time.perf_counter() - t0, 1), "timed_out": timed_out}
    if lines:
        try:
            got = json.loads(lines[-1])
        except ValueError:  # a cut-off line: the try did not finish
            row["ok"], got = False, {}
        row.update({k: got[k] for k in ("peak_gib", "compile_s", "setup_gib") if k in got})
    row["child_max_rss_gib"] = round(usage.ru_maxrss / 2 ** 20, 2)  # ru_maxrss is in KiB on Linux
    if not row["ok"]:
        row["error_tail"] = (err or out).strip().splitlines()[-3:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", choices=["ours", "unsloth"], required=True)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--lo", type=int, required=True, help="a length expected to train (tried first)")
    ap.add_argument("--hi", type=int, required=True, help="a length expected not to (tried second)")
    ap.add_argument("--granularity", type=int, default=8192)
    ap.add_argument("--timeout", type=int, default=540, help="seconds per try")
    ap.add_argument("--budget", type=int, default=10 ** 9, help="stop bisecting after this many seconds in all")
    ap.add_argument("--mlp-tile-tokens", type=int, default=8192, help="ours: KernelOptions.mlp_tile_tokens")
    args = ap.parse_args()
    g = args.granularity
    lo, hi = args.lo // g * g, -(-args.hi // g) * g
    start, good, bad = time.perf_counter(), None, None

    def attempt(seq):
        row = try_length(args.system, args.shape, seq, args.timeout, args.mlp_tile_tokens)
        print(json.dumps(row), flush=True)
        return row["ok"]

    for seq in (lo, hi):
        if attempt(seq):
            good = seq
        else:
            bad = seq
            break
    while good is not None and bad is not None and bad - good > g and time.perf_counter() - start < args.budget:
        mid = (good + bad) // 2 // g * g
        if attempt(mid):
            good = mid
        else:
            bad = mid
    print(json.dumps({"bench": "longest_seq", "system": args.system, "shape": args.shape, "longest_ok": good,
                      "shortest_failed": bad, "granularity": g, "seconds": round(time.perf_counter() - start, 1),
                      "mlp_tile_tokens": args.mlp_tile_tokens if args.system == "ours" else None}), flush=True)


if __name__ == "__main__":
    main()
