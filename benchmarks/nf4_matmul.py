"""Microbenchmark of the fused NF4 matmul (kernels/nf4_matmul.py) against XLA and a dense bf16 matmul.

For M=4096 tokens and the (N, K) of Llama-3.1-8B's and Llama-3.2-1B's projections, forward (x @ deq(W)^T)
and transposed (dy @ deq(W), the backward's dX), one JSON line each:

  kernel_ms   the fused Pallas kernel (including the tiny XLA op that decodes the scales)
  xla_ms      XLA's dequantize-then-matmul (`nf4_matmul_reference`: a bf16 W is written, then cuBLAS)
  dense_ms    a plain bf16 matmul with an already dense W (what a 16-bit model pays)
  floor_ms    max(FLOPs / 784e12, bytes / copy bandwidth measured here), bytes = activation + NF4 weight
              (packed + absmax) + output, each once
  *_frac      floor / time (1.0 = at the floor)

`--impls xla_onepass dequant ...` times what the training step runs instead of the reference: lora_op's one-pass
dequantize then cuBLAS (`xla_onepass_ms`, `_lean` with the memory-lean select tree), and that dequantize alone
(`dequant_ms`, `dequant_gbps` = NF4 bytes in + bf16 bytes out per second).

With `--lora R` every op also carries a rank-R LoRA term (x @ deq(W)^T + xa @ b^T; dy @ deq(W) + gb @ a),
and the line gets `lora_r` and two more timings:

  kernel_ms          the fused kernel with `lora=` (the LoRA product as one more step in its accumulator)
  xla_ms / dense_ms  XLA's dequantize-then-matmul / the dense matmul, plus the LoRA product, added in fp32
  kernel_nolora_ms   the same kernel without the LoRA term (kernel_ms - this = what the LoRA step costs)
  kernel_unfused_ms  that kernel, then the LoRA product and add in XLA as kernels/lora_op.py does them today
                     (a bf16 [M, out] LoRA product and an add: the passes the fusion removes)

Times: each jitted call runs one op on each of `--sets` distinct input sets (at least 200 MB of them, so
repeated runs do not find warm data in the 50 MB L2, and XLA cannot merge the calls); per-op time = call
time / sets, median over `--reps` calls after warm-up, timed with CUPTI (device time of the kernels) where
it works, else the host clock. Run on the GPU machine; the lines are appended to results.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.kernels import KernelOptions
from fastlora_jax.kernels import nf4_matmul as nm
from fastlora_jax.kernels.lora_op import dense_base_weight
from fastlora_jax.quant import NF4Weight

PEAK_FLOPS = 784e12  # bf16 dense, H100 SXM (the project's ANCHORS.md figure)

SHAPES = {
    "llama-3.1-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "llama-3.2-1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],
}


TIMER = {"kind": "cupti"}


def _time_call(fn, args, reps: int, warmup: int = 2) -> float:
    """Median seconds of one call of the jitted `fn(*args)`.

    CUPTI (Mosaic GPU's profiler: the summed device time of the call's kernels, no launch gaps) where it
    works, else the host clock around each call with a block_until_ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if TIMER["kind"] == "cupti":
        try:
            from jax.experimental.mosaic.gpu import profiler
            _, ms = profiler.measure(fn, iterations=reps)(*args)
            return statistics.median(ms) / 1e3
        except Exception as e:  # noqa: BLE001 - fall back to the host clock, say so once
            print(json.dumps({"note": f"CUPTI timing unavailable ({type(e).__name__}: {str(e)[:200]}); "
                                      "using the host clock"}), file=sys.stderr, flush=True)
            TIMER["kind"] = "wall"
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written (x + 1 over a large array)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    t = _time_call(f, (x,), reps)
    del x
    return 2 * nbytes / t


def dense_rate(n: int = 8192, reps: int = 10) -> float:
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n ** 3 / _time_call(f, (a, b), reps)


def _make_sets(m, n, k, sets, transposed, seed=0, lora_r=None):
    """Per set: activation, NF4 weight, its dense bf16 copy, and the LoRA pair (left [m, r], right [n, r] or
    [r, k]; None without --lora)."""
    key = jax.random.key(seed)
    xs, ws, dense, loras = [], [], [], []
    for i in range(sets):
        kw, kx = jax.random.split(jax.random.fold_in(key, i))
        kl, kr = jax.random.split(jax.random.fold_in(key, sets + i))
        w_bf16 = (jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
        w = NF4Weight.quantize(w_bf16)
        ws.append(w)
        dense.append(w.dequantize(jnp.bfloat16))
        xs.append(jax.random.normal(kx, (m, n if transposed else k), jnp.bfloat16))
        if lora_r is None:
            loras.append(None)
        else:
            right_shape = (lora_r, k) if transposed else (n, lora_r)
            loras.append((jax.random.normal(kl, (m, lora_r), jnp.bfloat16),
                          (jax.random.normal(kr, right_shape, jnp.float32) * 0.02).astype(jnp.bfloat16)))
    return xs, ws, dense, loras


VARIANTS = {
    "shared": nm.TileConfig(shared_dequant=True),
    "split": nm.TileConfig(shared_dequant=False),
    "split5": nm.TileConfig(shared_dequant=False, stages=5),
    "shared_m0": nm.TileConfig(shared_dequant=True, grid_minor=0),
    "shared_w16": nm.TileConfig(shared_dequant=True, grid_tile_width=16),
}


def _kernel_names(fn, args):
    """(kernel name, ms) of one call, through CUPTI; None where CUPTI is unavailable."""
    try:
        from jax.experimental.mosaic.gpu import profiler
        _, per_kernel = profiler.measure(fn, aggregate=False)(*args)
        return [(name[:60], round(ms, 4)) for name, ms in per_kernel]
    except Exception:  # noqa: BLE001
        return None


def _example_dense_pallas(xs, dense, transposed):
    """JAX's own Hopper bf16 Pallas matmul (ops/gpu/hopper_matmul_mgpu.py) on the dense weight, with the
    same CTA skeleton as our shared layout (2 x 128 x 128 warpgroup tiles along M, k-step 64, 4 stages):
    what this pipeline structure reaches when there is nothing to dequantize."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    cfg = hm.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
                          wg_dimension=hm.MatmulDimension.M, grid_tile_width=8)
    bs = [d if transposed else d.T for d in dense]          # [contraction, out]
    bs = [jnp.asarray(b) for b in jax.block_until_ready(bs)]
    return jax.jit(lambda xs, bs: [hm.matmul(x, b, None, cfg) for x, b in zip(xs, bs)]), (xs, bs)


def bench_shape(model, m, n, k, transposed, *, sets, reps, copy_bw, config, impls, variants=(), lora_r=None):
    out_cols = k if transposed else n
    kc = n if transposed else k
    lora_bytes = 0 if lora_r is None else (m + out_cols) * lora_r * 2
    if sets is None:  # enough distinct inputs that they cannot stay in the 50 MB L2 between runs
        set_bytes = m * kc * 2 + n * k // 2 + m * out_cols * 2 + lora_bytes
        sets = int(min(32, max(4, -(-200_000_000 // set_bytes))))
    xs, ws, dense, loras = _make_sets(m, n, k, sets, transposed, lora_r=lora_r)
    op = nm.nf4_matmul_t if transposed else nm.nf4_matmul
    lora_eq = "mr,rk->mk" if transposed else "mr,nr->mn"

    def multi(impl):
        """A jitted function of (xs, ws or dense, loras) running one op per set."""
        if impl == "dense":
            eq = "mn,nk->mk" if transposed else "mk,nk->mn"

            def one(x, d, lr):
                y = jnp.einsum(eq, x, d, preferred_element_type=jnp.float32)
                if lr is not None:
                    y = y + jnp.einsum(lora_eq, *lr, preferred_element_type=jnp.float32)
                return y.astype(jnp.bfloat16)
        elif impl in ("xla_onepass", "xla_onepass_lean", "dequant", "dequant_lean"):
            # what the training step runs: lora_op's one-pass dequantize (an indexed table load, or the memory-lean
            # select tree), then cuBLAS; "dequant*" is the dequantize alone (bytes in, a bf16 W out)
            options = KernelOptions(memory_lean=impl.endswith("_lean"))
            eq = "mn,nk->mk" if transposed else "mk,nk->mn"

            def one(x, w, lr):
                d = dense_base_weight(w, jnp.bfloat16, options)
                if impl.startswith("dequant"):
                    return d
                y = jnp.einsum(eq, x, d, preferred_element_type=jnp.float32)
                if lr is not None:
                    y = y + jnp.einsum(lora_eq, *lr, preferred_element_type=jnp.float32)
                return y.astype(jnp.bfloat16)
        elif impl == "pallas_nolora":
            def one(x, w, lr):
                return op(x, w, impl="pallas", config=config)
        elif impl == "pallas_unfused":  # as kernels/lora_op.py: a bf16 LoRA product, then the add
            def one(x, w, lr):
                return op(x, w, impl="pallas", config=config) + jnp.einsum(lora_eq, *lr,
                                                                           preferred_element_type=jnp.bfloat16)
        else:
            def one(x, w, lr):
                return op(x, w, lora=lr, impl=impl, config=config)
        return jax.jit(lambda xs, ws, lrs: [one(x, w, lr) for x, w, lr in zip(xs, ws, lrs)])

    res = {}
    for impl in impls:
        args = (xs, dense, loras) if impl == "dense" else (xs, ws, loras)
        try:
            if impl == "dense_pallas":
                fn, args = _example_dense_pallas(xs, dense, transposed)
                res[impl] = _time_call(fn, args, reps) / sets
                continue
            res[impl] = _time_call(multi(impl), args, reps) / sets
            if impl == "pallas":
                one = jax.jit(lambda x, w, lr: op(x, w, lora=lr, impl="pallas", config=config))
                res["kernels"] = _kernel_names(one, (xs[0], ws[0], loras[0]))
        except Exception as e:  # report, keep going with the other impls
            res[impl] = None
            res[impl + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    var_ms = {}
    for name in variants:
        vcfg = VARIANTS[name]
        if not nm.supported(m, n, k, transposed=transposed, config=vcfg):
            continue
        try:
            fn = jax.jit(lambda xs, ws, lrs, vcfg=vcfg: [op(x, w, lora=lr, impl="pallas", config=vcfg)
                                                          for x, w, lr in zip(xs, ws, lrs)])
            var_ms[name] = round(_time_call(fn, (xs, ws, loras), reps) / sets * 1e3, 4)
        except Exception as e:  # noqa: BLE001
            var_ms[name] = f"{type(e).__name__}: {str(e)[:200]}"
    # correctness of what was timed, on the first set
    if res.get("pallas") is not None:
        reference = nm.nf4_matmul_t_reference if transposed else nm.nf4_matmul_reference
        ref = reference(xs[0], ws[0], lora=loras[0])
        got = op(xs[0], ws[0], lora=loras[0], impl="pallas", config=config)
        d = np.asarray(got, np.float64) - np.asarray(ref, np.float64)
        res["kernel_rel_l2"] = float(np.linalg.norm(d) / np.linalg.norm(np.asarray(ref, np.float64)))

    flops = 2 * m * n * k + (0 if lora_r is None else 2 * m * lora_r * out_cols)
    nbytes = m * kc * 2 + ws[0].nbytes + m * out_cols * 2 + lora_bytes
    t_flops, t_bytes = flops / PEAK_FLOPS, nbytes / copy_bw
    floor = max(t_flops, t_bytes)
    line = {
        "bench": "nf4_matmul", "op": "t" if transposed else "fwd", "model": model, "M": m, "N": n, "K": k,
        "kernel_ms": None if res.get("pallas") is None else round(res["pallas"] * 1e3, 4),
        "xla_ms": None if res.get("xla") is None else round(res["xla"] * 1e3, 4),
        "dense_ms": None if res.get("dense") is None else round(res["dense"] * 1e3, 4),
        "floor_ms": round(floor * 1e3, 4), "floor_bound": "flops" if t_flops >= t_bytes else "bytes",
        "gflop": round(flops / 1e9, 3), "mbytes": round(nbytes / 1e6, 2), "sets": sets, "reps": reps,
        "timer": TIMER["kind"],
    }
    if lora_r is not None:
        line["lora_r"] = lora_r
        for impl, key in (("pallas_nolora", "kernel_nolora_ms"), ("pallas_unfused", "kernel_unfused_ms")):
            if impl in res:
                line[key] = None if res[impl] is None else round(res[impl] * 1e3, 4)
        if res.get("pallas") and res.get("pallas_nolora"):
            line["lora_step_ms"] = round((res["pallas"] - res["pallas_nolora"]) * 1e3, 4)
        if res.get("pallas") and res.get("pallas_unfused"):
            line["fused_speedup_vs_unfused"] = round(res["pallas_unfused"] / res["pallas"], 3)
    for impl in ("xla_onepass", "xla_onepass_lean", "dequant", "dequant_lean"):
        if res.get(impl):
            line[f"{impl}_ms"] = round(res[impl] * 1e3, 4)
            if impl.startswith("dequant"):  # bytes: NF4 in (packed + scales), bf16 W out
                line[f"{impl}_gbps"] = round((ws[0].nbytes + n * k * 2) / res[impl] / 1e9, 1)
            elif res.get("dense"):
                line[f"dense_over_{impl}"] = round(res["dense"] / res[impl], 3)
    if "dense_pallas" in res:
        line["dense_pallas_ms"] = None if res["dense_pallas"] is None else round(res["dense_pallas"] * 1e3, 4)
    if var_ms:
        line["variants_ms"] = var_ms
    if res.get("kernels"):
        line["kernels"] = res["kernels"]
    for impl, key in (("pallas", "kernel"), ("xla", "xla"), ("dense", "dense")):
        if res.get(impl):
            line[f"{key}_frac"] = round(floor / res[impl], 3)
            line[f"{key}_tflops"] = round(flops / res[impl] / 1e12, 1)
    if res.get("pallas") and res.get("xla"):
        line["kernel_speedup_vs_xla"] = round(res["xla"] / res["pallas"], 3)
    for key in ("kernel_rel_l2", "pallas_error", "xla_error", "dense_error", "dense_pallas_error",
                "pallas_nolora_error", "pallas_unfused_error"):
        if key in res:
            line[key] = res[key]
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--ops", nargs="+", default=["fwd", "t"], choices=["fwd", "t"])
    ap.add_argument("--impls", nargs="+", default=None,
                    choices=["pallas", "xla", "dense", "dense_pallas", "pallas_nolora", "pallas_unfused",
                             "xla_onepass", "xla_onepass_lean", "dequant", "dequant_lean"],
                    help="default: pallas xla dense (+ pallas_nolora pallas_unfused with --lora)")
    ap.add_argument("--lora", type=int, default=None, metavar="R",
                    help="add a rank-R LoRA term to every op (R <= 64 for the kernel)")
    ap.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                    help="other kernel configurations to time as well (variants_ms)")
    ap.add_argument("--shared-dequant", type=int, default=int(nm.DEFAULT_CONFIG.shared_dequant))
    ap.add_argument("--sets", type=int, default=None, help="distinct input sets per timed call (default: >= 200 MB)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--stages", type=int, default=nm.DEFAULT_CONFIG.stages)
    ap.add_argument("--grid-minor", type=int, default=nm.DEFAULT_CONFIG.grid_minor)
    ap.add_argument("--grid-tile-width", type=int, default=nm.DEFAULT_CONFIG.grid_tile_width)
    ap.add_argument("--only", default=None, help="N,K: a single shape")
    ap.add_argument("--command", default=None, help="the command line to record")
    args = ap.parse_args(argv)
    impls = args.impls or (["pallas", "xla", "dense"] + ([] if args.lora is None else ["pallas_nolora", "pallas_unfused"]))
    if args.lora is None and {"pallas_nolora", "pallas_unfused"} & set(impls):
        ap.error("--impls pallas_nolora / pallas_unfused need --lora R")

    config = nm.TileConfig(stages=args.stages, grid_minor=args.grid_minor, grid_tile_width=args.grid_tile_width,
                           shared_dequant=bool(args.shared_dequant))
    dev = jax.devices()[0]
    copy_bw = copy_bandwidth()
    meta = {
        "gpu": dev.device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
        "command": args.command or "python benchmarks/nf4_matmul.py " + " ".join(argv or sys.argv[1:]),
        "copy_gbps": round(copy_bw / 1e9, 1), "config": {"stages": config.stages, "grid_minor": config.grid_minor,
                                                          "grid_tile_width": config.grid_tile_width,
                                                          "shared_dequant": config.shared_dequant},
    }
    if args.lora is not None:
        meta["lora_r"] = args.lora
    print(json.dumps({"bench": "nf4_matmul_ceilings", **meta, "dense_8192_tflops": round(dense_rate() / 1e12, 1)}),
          flush=True)
    rows = []
    for model in args.models:
        shapes = SHAPES[model]
        if args.only:
            shapes = [tuple(int(v) for v in args.only.split(","))]
        for n, k in shapes:
            for op in args.ops:
                line = bench_shape(model, args.m, n, k, op == "t", sets=args.sets, reps=args.reps,
                                   copy_bw=copy_bw, config=config, impls=impls, variants=args.variants,
                                   lora_r=args.lora)
                line.update(meta)
                print(json.dumps(line), flush=True)
                rows.append(line)
    print("\n| model | op | M | N | K | kernel ms | frac of floor | XLA ms | XLA frac | dense ms | kernel/XLA | "
          "variants ms | dense Pallas ms |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        var = " ".join(f"{k}={v}" for k, v in (r.get("variants_ms") or {}).items())
        print(f"| {r['model']} | {r['op']} | {r['M']} | {r['N']} | {r['K']} | {r['kernel_ms']} | "
              f"{r.get('kernel_frac')} | {r['xla_ms']} | {r.get('xla_frac')} | {r['dense_ms']} | "
              f"{r.get('kernel_speedup_vs_xla')} | {var} | {r.get('dense_pallas_ms')} |", file=sys.stderr)
    if args.lora is not None:
        print("\n| model | op | N | K | R | fused kernel ms | kernel, no LoRA ms | kernel + XLA LoRA ms | "
              "fused/unfused speedup | XLA deq+matmul+LoRA ms |", file=sys.stderr)
        print("|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
        for r in rows:
            print(f"| {r['model']} | {r['op']} | {r['N']} | {r['K']} | {r['lora_r']} | {r['kernel_ms']} | "
                  f"{r.get('kernel_nolora_ms')} | {r.get('kernel_unfused_ms')} | {r.get('fused_speedup_vs_unfused')} "
                  f"| {r['xla_ms']} |", file=sys.stderr)


if __name__ == "__main__":
    main()
