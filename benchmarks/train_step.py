"""LoRA / QLoRA train-step benchmark on the GPU: one JSON line per config.

    python benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 8192 --gc unsloth true false
    python benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 4096 --mesh data=2,fsdp=4

Random weights are drawn and NF4-quantized on the GPU (no files). LoRA r=16, alpha=16 on the 7
projections, AdamW, random tokens with labels = inputs (the ANCHORS.md workload). Each config runs in
its own process so that peak memory is its own. tokens/s is the median step after warm-up.

`--mesh data=N,fsdp=M` (fastlora_jax.sharding) runs the step over N x M devices: the base drawn straight into
its FSDP shards, `--batch` rows on every device (so the step has batch x N x M rows). The line then adds
`tokens_per_s_per_device` and `peak_gib_per_device` (each local device's `memory_stats()`); `peak_gib` is their
maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from config_process import run_config  # noqa: E402


def flops_per_token(cfg, seq: int) -> float:
    """ANCHORS.md: 4 * N_matmul + 3 * (2 * seq * hidden * layers), lm_head included in N_matmul."""
    from fastlora_jax.models import decoder
    per_layer = sum(s[0] * s[1] for s, kind in decoder.layer_tensors(cfg).values() if kind == "linear")
    n_matmul = per_layer * cfg.num_layers + cfg.vocab_size * cfg.hidden_size
    return 4 * n_matmul + 3 * (2 * seq * cfg.hidden_size * cfg.num_layers)


def kernel_options(args):
    """The CLI's kernel flags as the `KernelOptions` every traced program of the run takes."""
    from fastlora_jax.kernels import KernelOptions
    return KernelOptions(nf4_matmul=args.nf4_matmul, lora_fold=not args.no_lora_fold, attention=args.attention,
                         lean_weight_tile_bytes=args.lean_tile_mib << 20, mlp_tile_tokens=args.mlp_tile_tokens,
                         lean_offload=args.lean_offload, nf4_lookup=args.nf4_lookup, unroll_layers=args.unroll_layers,
                         false_mode_saves=false_saves(args))


def false_saves(args) -> tuple[str, ...]:
    from fastlora_jax.kernels import KernelOptions
    if args.false_saves is None:
        return KernelOptions().false_mode_saves
    return tuple(name for name in args.false_saves.split(",") if name)


def options_label(options, xla_step_options) -> str:
    """`_name=value` for each kernel option set away from its default and each --xla-option, so that the profiles of
    two variants of one point do not overwrite each other's files ('' for the defaults)."""
    from dataclasses import fields

    from fastlora_jax.kernels import KernelOptions
    auto = {"memory_lean", "host_offload_bytes", "flops_per_host_byte"}  # set by the model from its mode and host
    default = KernelOptions()
    parts = [f"{f.name}={getattr(options, f.name)}" for f in fields(options)
             if f.name not in auto and getattr(options, f.name) != getattr(default, f.name)]
    parts += [f"{name.removeprefix('xla_gpu_')}={value}" for name, value in sorted((xla_step_options or {}).items())]
    return "".join("_" + "".join(c if c.isalnum() or c in ".-" else "-" for c in part) for part in parts)


def kernel_flags(args) -> list[str]:
    """The same flags for the per-config child process."""
    return (["--nf4-matmul", args.nf4_matmul, "--attention", args.attention, "--lean-tile-mib", str(args.lean_tile_mib),
             "--mlp-tile-tokens", str(args.mlp_tile_tokens), "--lean-offload", args.lean_offload,
             "--nf4-lookup", args.nf4_lookup, "--false-saves", ",".join(false_saves(args))]
            + (["--no-lora-fold"] if args.no_lora_fold else []) + (["--unroll-layers"] if args.unroll_layers else [])
            + [flag for opt in args.xla_option for flag in ("--xla-option", opt)])


def xla_options(specs: list[str]) -> dict:
    """`NAME=true|false|int` pairs -> the step's extra XLA options (training.make_train_step's compiler_options)."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.startswith("xla_"):
            raise SystemExit(f"--xla-option {spec!r}: expected NAME=VALUE with an XLA option name (xla_...)")
        out[name] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return out


def run_one(shape: str, batch: int, seq: int, gc: str, steps: int, load_in_4bit: bool,
            profile_steps: int = 0, options=None, loss_chunk_tokens: int = 0, compile_first: bool = False,
            mesh_spec: str | None = None, xla_step_options: dict | None = None) -> dict:
    from fastlora_jax import sharding
    mesh = sharding.resolve_mesh(mesh_spec)  # first: jax.distributed (if its variables are set) before any device use

    import jax
    import jax.numpy as jnp
    import numpy as np
    from fastlora_jax.convert.load import random_base_params
    from shapes import hf_config as shape_config

    from fastlora_jax import FastLanguageModel
    from fastlora_jax.model import CausalLM
    from fastlora_jax.models.registry import family_for
    from fastlora_jax.training import make_optimizer, make_train_step, step_compiler_options

    hf_config = shape_config(shape)
    family = family_for(hf_config, where=f"shape {shape!r}")
    cfg = family.config(hf_config)
    dtype = jnp.bfloat16
    devices = 1 if mesh is None else mesh.size
    base = random_base_params(family, cfg, dtype, load_in_4bit, mesh=mesh)
    model = CausalLM(hf_config, family, cfg, base, dtype, name_or_path=shape, max_seq_length=seq, mesh=mesh,
                     **({} if options is None else {"kernel_options": options}))
    mode = {"unsloth": "unsloth", "true": True, "false": False}[gc]
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                             use_gradient_checkpointing=mode, random_state=3407)
    model.loss_chunk_tokens = loss_chunk_tokens or None
    optimizer = make_optimizer(learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0)
    lora = model.lora_params
    opt_state = optimizer.init(lora)
    if mesh is not None:
        opt_state = sharding.place(opt_state, sharding.replicated(mesh))
    step = make_train_step(model, optimizer, compiler_options=xla_step_options)
    rng = np.random.default_rng(0)
    jax.block_until_ready((lora, opt_state))
    setup_stats = [d.memory_stats() or {} for d in jax.local_devices()[:devices]]  # CPU: no stats
    setup_bytes = max(s.get("bytes_in_use", 0) for s in setup_stats)
    setup_peak = max(s.get("peak_bytes_in_use", 0) for s in setup_stats)  # drawing and quantizing the random base

    def batch_arrays():  # `batch` rows on every device (the train step splits them over the mesh)
        ids = rng.integers(0, cfg.vocab_size, (1, batch * devices, seq)).astype(np.int32)
        return sharding.put_batch({"input_ids": ids, "labels": ids}, mesh) if mesh is not None else \
            {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}

    print(f"setup done: {setup_bytes / 2 ** 30:.2f} GiB in use", file=sys.stderr, flush=True)
    compiled_memory = {}
    if compile_first:  # compile ahead (the autotuner allocates its own operand buffers) and read the peak then
        with sharding.use_mesh(mesh):
            compiled = step.jitted.lower(model.base_params, lora, opt_state, batch_arrays(), None).compile()
        analysis = compiled.memory_analysis()
        compiled_memory = {
            "compile_peak_gib": round((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 30, 3),
            **{f"xla_{k}_gib": round(getattr(analysis, f"{k}_size_in_bytes") / 2 ** 30, 3)
               for k in ("temp", "argument", "output", "alias")}}
        print(f"compiled ahead: {compiled_memory}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    lora, opt_state, metrics = step(lora, opt_state, batch_arrays(), None)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 2 if steps else 0):  # --steps 0: the first (compiling) step only (longest_seq.py)
        b = batch_arrays()
        jax.block_until_ready(b)
        t0 = time.perf_counter()
        lora, opt_state, metrics = step(lora, opt_state, b, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    times = times[2:]  # 3 warm-up steps in all, counting the compiling one
    profile = None
    if profile_steps:
        import tempfile
        trace_dir = tempfile.mkdtemp(prefix="fastlora_trace_")
        with jax.profiler.trace(trace_dir):
            for _ in range(profile_steps):
                lora, opt_state, metrics = step(lora, opt_state, batch_arrays(), None)
            jax.block_until_ready(metrics)
        stem = f"{shape}_{gc}_{batch}x{seq}{options_label(model.kernel_options, xla_step_options)}"
        out_json = (str(Path(os.environ["OUT"], f"kernels_{stem}.json"))
                    if os.environ.get("OUT") and shape != "tiny" else None)
        profile = summarize_trace(trace_dir, profile_steps, out_json)
        if os.environ.get("OUT") and shape != "tiny":  # the compiled HLO, to map kernel names to ops
            with sharding.use_mesh(mesh):
                hlo = step.jitted.lower(model.base_params, lora, opt_state, batch_arrays(), None).compile().as_text()
            Path(os.environ["OUT"], f"hlo_{stem}.txt").write_text(hlo)
    median = float(np.median(times)) if times else compile_s
    tokens = batch * seq * devices
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()[:devices]]
    tps = tokens / median  # with --steps 0: of the compiling step
    per_device = {} if mesh is None else {
        "mesh": sharding.describe(mesh), "devices": devices, "tokens_per_s_per_device": round(tps / devices, 1),
        "peak_gib_per_device": [round(p / 2 ** 30, 3) for p in peaks]}
    return {
        "bench": "train_step", "system": "fastlora_jax", "gpu": jax.devices()[0].device_kind, "shape": shape,
        "batch": batch, "seq": seq, "gc": gc, "load_in_4bit": load_in_4bit, "tokens_per_s": round(tps, 1),
        **per_device, "step_ms": round(median * 1e3, 2), "peak_gib": round(max(peaks) / 2 ** 30, 3),
        "setup_gib": round(setup_bytes / 2 ** 30, 3), "setup_peak_gib": round(setup_peak / 2 ** 30, 3),
        "mfu": round(tps / devices * flops_per_token(cfg, seq) / 784e12, 4),  # per device
        "compile_s": round(compile_s, 1), "loss": float(metrics["loss"]), "steps": steps, "jax": jax.__version__,
        "nf4_matmul": model.kernel_options.nf4_matmul, "lora_fold": model.kernel_options.lora_fold,
        "attention": model.kernel_options.attention, "lean_tile_mib": model.kernel_options.lean_weight_tile_bytes >> 20,
        "mlp_tile_tokens": model.kernel_options.mlp_tile_tokens, "nf4_lookup": model.kernel_options.nf4_lookup,
        "unroll_layers": model.kernel_options.unroll_layers, "false_mode_saves": list(model.kernel_options.false_mode_saves),
        "xla_options": step_compiler_options(model.use_gradient_checkpointing, xla_step_options),
        **offload_choice(model, cfg, mode, batch, seq, dtype),
        **compiled_memory, **({"profile": profile} if profile else {}),
    }


def offload_choice(model, cfg, mode, batch: int, seq: int, dtype) -> dict:
    """What the "unsloth" step offloads per layer (`decoder.lean_offload_attention` on this shape) and the measured
    FLOPs per host byte it chose by."""
    if mode != "unsloth":
        return {}
    import jax

    from fastlora_jax import training
    from fastlora_jax.models import decoder
    options = training.step_options(model.kernel_options, mode)
    x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), dtype)
    attention = training.host_offload_supported() and decoder.lean_offload_attention(cfg, x, range(cfg.num_layers),
                                                                                       options)
    return {"lean_offload": model.kernel_options.lean_offload, "offloads": "attention" if attention else "layer_input",
            "flops_per_host_byte": options.flops_per_host_byte,
            "layer_flops_per_offloaded_byte": round(decoder.layer_flops_per_offloaded_byte(cfg, x, options))}


CATEGORIES = (  # first match wins; kernel names as the CUDA profiler reports them
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "wgmma", "matmul", "dot")),
    ("host offload copies", ("memcpy", "copy")),
    ("fusions (elementwise, reductions, dequantize)", ("fusion", "loop", "reduce", "input_", "transpose")),
)


def copy_overlap(intervals) -> tuple[int, int]:
    """(time anything runs on the GPU, time a host copy runs while nothing else does), from (start, end, is_copy)
    intervals of one GPU: the copy time not hidden. "Anything else" includes device-to-device copies and memsets."""
    edges = sorted([(a, 1, c) for a, b, c in intervals] + [(b, -1, c) for a, b, c in intervals])
    busy = exposed = 0
    running = {True: 0, False: 0}
    last = None
    for t, delta, is_copy in edges:
        if last is not None and t > last:
            if running[True] or running[False]:
                busy += t - last
            if running[True] and not running[False]:
                exposed += t - last
        running[is_copy] += delta
        last = t
    return busy, exposed


def summarize_trace(trace_dir: str, steps: int, out_json: str | None = None) -> dict:
    """GPU kernel time per step by category and the top kernels, from the profiler's xplane file."""
    import glob

    from jax.profiler import ProfileData
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return {"error": "no trace written"}
    data = ProfileData.from_file(files[0])
    per_kernel: dict[str, float] = {}
    busy = exposed = 0
    copy_lines: dict[str, float] = {}  # which streams the host copies ran on
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        intervals = []  # (start, end, is a host copy) of this GPU: a copy hides only behind its own GPU's kernels
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.duration_ns / 1e6 / steps
                is_copy = event.name in ("MemcpyD2H", "MemcpyH2D")
                intervals.append((event.start_ns, event.end_ns, is_copy))
                if is_copy:
                    key = f"{line.name}: {event.name}"
                    copy_lines[key] = copy_lines.get(key, 0.0) + event.duration_ns / 1e6 / steps
        plane_busy, plane_exposed = copy_overlap(intervals)
        busy, exposed = busy + plane_busy, exposed + plane_exposed
    by_category: dict[str, float] = {}
    for name, ms in per_kernel.items():
        low = name.lower()
        category = next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")
        by_category[category] = by_category.get(category, 0.0) + ms
    if out_json:  # every kernel, to map the fusions to the compiled HLO afterwards
        Path(out_json).write_text(json.dumps(dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))))
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return {"gpu_ms_per_step": round(sum(per_kernel.values()), 2),
            "gpu_busy_ms_per_step": round(busy / 1e6 / steps, 2),
            "host_copy_exposed_ms_per_step": round(exposed / 1e6 / steps, 2),
            "host_copy_ms_by_stream": {k: round(v, 2) for k, v in sorted(copy_lines.items())},
            "by_category_ms": {k: round(v, 2) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:120], round(ms, 3)] for name, ms in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--gc", nargs="+", default=["unsloth"], choices=["unsloth", "true", "false"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, trace STEPS more steps and report GPU time by kernel category")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per config (default: %(default)s)")
    parser.add_argument("--vs-unsloth", action="store_true",
                        help="also run ../shared/bench/torch_peers.py (carried as .peers/) for Unsloth in this invocation")
    parser.add_argument("--loss-chunk-tokens", type=int, default=0,
                        help="tokens per loss chunk (0: the mode's default, training.default_chunk_tokens)")
    parser.add_argument("--nf4-matmul", default="xla", choices=["xla", "pallas"],
                        help="KernelOptions.nf4_matmul (default: %(default)s)")
    parser.add_argument("--no-lora-fold", action="store_true", help="KernelOptions(lora_fold=False), for A/B timing")
    parser.add_argument("--unroll-layers", action="store_true",
                        help="KernelOptions(unroll_layers=True): the decoder layers as a Python loop, not a scan")
    parser.add_argument("--false-saves", default=None,
                        help="KernelOptions.false_mode_saves, comma-separated ('' for none; default: the option's)")
    parser.add_argument("--lean-tile-mib", type=int, default=128,
                        help="KernelOptions.lean_weight_tile_bytes in MiB (memory-lean modes; default: %(default)s)")
    parser.add_argument("--mlp-tile-tokens", type=int, default=0,
                        help="KernelOptions.mlp_tile_tokens: the MLP in sequence tiles of at most N tokens, each "
                             "recomputed in the backward pass (0: untiled; default: %(default)s)")
    parser.add_argument("--lean-offload", default="auto", choices=["auto", "layer_input", "attention"],
                        help="KernelOptions.lean_offload (--gc unsloth; default: %(default)s)")
    parser.add_argument("--nf4-lookup", default="auto", choices=["auto", "table", "select"],
                        help="KernelOptions.nf4_lookup (default: %(default)s)")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "flash"],
                        help="KernelOptions.attention (default: %(default)s)")
    parser.add_argument("--compile-first", action="store_true",
                        help="compile the step ahead and report the peak after compiling and XLA's memory analysis")
    parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=M",
                        help="run over a mesh of N x M devices (fastlora_jax.sharding); --batch rows per device")
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA option of the step over its own (training.step_compiler_options), e.g. "
                             "xla_gpu_enable_pipelined_host_offloading=false (repeatable)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.shape, args.batch, args.seq, args.gc[0], args.steps, not args.no_4bit,
                                 args.profile, kernel_options(args), args.loss_chunk_tokens,
                                 args.compile_first, args.mesh, xla_options(args.xla_option))), flush=True)
        return
    ours = {}
    for gc in args.gc:
        cmd = [sys.executable, __file__, "--one", "--shape", args.shape, "--batch", str(args.batch), "--seq",
               str(args.seq), "--gc", gc, "--steps", str(args.steps), "--profile", str(args.profile)]
        cmd += (["--no-4bit"] if args.no_4bit else []) + kernel_flags(args)
        cmd += ["--loss-chunk-tokens", str(args.loss_chunk_tokens)] + (["--compile-first"] if args.compile_first else [])
        cmd += ["--mesh", args.mesh] if args.mesh else []
        head = {"bench": "train_step", "shape": args.shape, "batch": args.batch, "seq": args.seq, "gc": gc,
                **({"mesh": args.mesh} if args.mesh else {})}
        row = run_config(cmd, head, args.timeout, "train_step_stderr.log")
        if row is not None:
            ours[gc] = row
    if args.vs_unsloth:
        for gc in args.gc:
            peer = run_unsloth(args.shape, args.batch, args.seq, gc)
            print(json.dumps(peer), flush=True)
            if gc in ours and "tokens_per_s" in peer:
                mine = ours[gc]
                print(json.dumps({"bench": "ratio_vs_unsloth", "shape": args.shape, "batch": args.batch,
                                  "seq": args.seq, "gc": gc,
                                  "tokens_per_s_ratio": round(mine["tokens_per_s"] / peer["tokens_per_s"], 3),
                                  "peak_ratio": round(mine["peak_gib"] / peer["peak_gib"], 3)}), flush=True)


PEERS = HERE.parent / ".peers"


def peers_env() -> dict:
    """The environment a peer process runs in: the carried site-packages bundle unpacked once, offline."""
    site = Path("/tmp/peers-site")
    if not site.is_dir():
        site.mkdir(parents=True)
        subprocess.run(["tar", "xzf", str(PEERS / "peers-site.tgz"), "-C", str(site)], check=True)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(site))


def run_unsloth(shape: str, batch: int, seq: int, gc: str) -> dict:
    """Unsloth on the same shape, in its own process, from the carried peers bundle (ANCHORS.md)."""
    cmd = [sys.executable, str(PEERS / "torch_peers.py"), "unsloth", shape, "--bs", str(batch), "--seq", str(seq),
           "--gc", gc]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peers_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"bench": "train_step", "system": "unsloth", "shape": shape, "gc": gc,
                "error": (proc.stderr or proc.stdout).strip().splitlines()[-4:]}
    row = json.loads(lines[-1])
    row.update(bench="train_step", system="unsloth")
    if "peak_gib" not in row:
        for k in list(row):
            if "peak" in k and "gib" not in k and isinstance(row[k], (int, float)) and row[k] > 1e6:
                row["peak_gib"] = round(row[k] / 2 ** 30, 3)
    return row


if __name__ == "__main__":
    main()
