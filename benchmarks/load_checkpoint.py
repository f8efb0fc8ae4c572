"""Load a Llama-shaped random bf16 checkpoint with `load_in_4bit=True` and print one JSON line:
seconds, peak host RSS, GPU memory after load (and its peak), for the given shape.

    python benchmarks/load_checkpoint.py --shape llama-3.1-8b --dir /tmp/ckpt-8b

The checkpoint (sharded safetensors, ~5 GB shards as the hub has them) is made first, in a separate
process, if the directory holds none: random weights drawn on the GPU with torch when it is there (fast),
else with numpy. The load runs in a fresh process so that nothing of the making counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_checkpoint(directory: Path, shape: str, shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Random bf16 weights (normal, std 0.02) for `shape`, written shard by shard."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    from fastlora_jax.tiny import llama_tensor_specs
    from shapes import SHAPES

    config = LlamaConfig(**SHAPES[shape])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    directory.mkdir(parents=True, exist_ok=True)
    names_shapes = [(name, shape) for name, shape, _ in llama_tensor_specs(config)]
    try:
        import torch
        gen = torch.Generator(device="cuda").manual_seed(0) if torch.cuda.is_available() else None
    except ImportError:
        torch, gen = None, None

    def draw(shape_):
        if gen is not None:
            t = torch.randn(shape_, generator=gen, device="cuda", dtype=torch.float32).mul_(0.02)
            return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        rng = np.random.default_rng(0)
        return (rng.standard_normal(shape_, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    shards, current, size = [], {}, 0
    weight_map, total = {}, 0
    for name, shape_ in names_shapes:
        array = draw(shape_) if not name.endswith("norm.weight") else np.ones(shape_, ml_dtypes.bfloat16)
        if current and size + array.nbytes > shard_bytes:
            shards.append(_flush(current, directory, len(shards), save_file, weight_map))
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
    shards.append(_flush(current, directory, len(shards), save_file, weight_map))
    count = len(shards)
    final_map = {}
    for k, fname in enumerate(shards):
        new = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        (directory / fname).rename(directory / new)
        final_map.update({n: new for n, f in weight_map.items() if f == fname})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": final_map}))
    config.save_pretrained(directory)


def _flush(tensors, directory, index, save_file, weight_map) -> str:
    fname = f"part-{index}.safetensors"
    save_file(tensors, str(directory / fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in tensors})
    return fname


def load(directory: Path, shape: str) -> dict:
    import jax

    from fastlora_jax import FastLanguageModel
    jax.devices()  # start the backend first, so its own memory is in the baseline
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(str(directory), load_in_4bit=True)
    jax.block_until_ready(model.base_params)
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "bench": "load_checkpoint", "shape": shape, "load_in_4bit": True, "dtype": model.dtype.name,
        "seconds": round(seconds, 2),
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        "baseline_host_rss_gb": round(baseline_rss / 1e9, 3),
        "gpu_gb_after_load": round(stats.get("bytes_in_use", 0) / 1e9, 3),
        "gpu_peak_gb": round(stats.get("peak_bytes_in_use", 0) / 1e9, 3),
        "checkpoint_gb": round(sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9, 2),
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--dir", default="/tmp/fastlora-bench-ckpt")
    parser.add_argument("--only", choices=["make", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir) / args.shape
    if args.only == "make":
        make_checkpoint(directory, args.shape)
        return
    if args.only == "load":
        print(json.dumps(load(directory, args.shape)), flush=True)
        return
    if not (directory / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--dir", args.dir, "--only", "make"],
                       check=True)
        print(f"made {directory} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    env = dict(os.environ)
    subprocess.run([sys.executable, __file__, "--shape", args.shape, "--dir", args.dir, "--only", "load"],
                   check=True, env=env)


if __name__ == "__main__":
    main()
