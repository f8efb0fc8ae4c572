"""Benchmark of kernels/flash_attention.py on the GPU: one JSON line per (shape, implementation, pass).

Shapes: Gemma-2-9B attention (16 q heads, 8 kv heads, head_dim 256, logit soft-cap 50; local layers with a
4096 window, global layers without) and a Llama-like head_dim 128 (32 q / 8 kv heads; with and without a
4096 window as Mistral), at seq 2048 / 8192 / 32768 (batch 8 / 2 / 1: 16k-32k tokens per call), bf16, with a
key padding mask (all ones: what a packed batch passes).

Implementations (`impl` in the line):
  kernel      flash_attention: the Mosaic GPU forward kernel (+ the blockwise jnp backward in "fwd_bwd")
  blockwise   flash_attention_reference: pure jnp, online softmax over key blocks, blockwise custom_vjp
  dense       the jnp eager formulation (reference.attention_reference + cap + window), only where its
              [batch, heads, seq, seq] fp32 scores fit (seq <= 8192)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn") WITHOUT the cap (cuDNN has none), with
              the window as local_window_size: speed context only, not the same function when cap is set
  tokamax     tokamax.dot_product_attention(implementation="mosaic"): tokamax's Hopper Mosaic GPU forward and
              backward kernels (tokamax is not a dependency of the package: carry its wheels, benchmarks/README.md)

Fields: ms (median wall time of a jitted call, host clock around block_until_ready), tflops (useful
FLOPs of the causal/window band: 4*b*h*d*visible_pairs forward, 3.5x that for fwd_bwd, over ms), and
rel_l2_vs_blockwise: the kernel's output against `blockwise` (all rows see a key here); for tokamax without a cap,
rel_l2_vs_cudnn of the output ("fwd") and of the three gradients (the largest of them, "fwd_bwd"). Errors are
reported in the line (`error`), never fatal.
Usage: python benchmarks/flash_attention.py [--reps 5] [--only gemma] [--impls cudnn,tokamax] [--batch 2048:2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.kernels import flash_attention as fa
from fastlora_jax.kernels.reference import MASK_VALUE

SEQS = (2048, 8192, 32768)
BATCH = {2048: 8, 8192: 2, 32768: 1}
CONFIGS = [  # name, q_heads, kv_heads, head_dim, cap, window
    ("gemma2-9b-local", 16, 8, 256, 50.0, 4096),
    ("gemma2-9b-global", 16, 8, 256, 50.0, None),
    ("llama-d128", 32, 8, 128, None, None),
    ("llama-d64", 32, 8, 64, None, None),  # Llama-3.2-1B
    ("mistral-d128-window", 32, 8, 128, None, 4096),
]


def dense(q, k, v, mask_bs, scale, *, logit_softcap=None, sliding_window=None):
    b, s, h, d = q.shape
    hk = k.shape[2]
    q5 = q.reshape(b, s, hk, h // hk, d)
    sc = jnp.einsum("bqkgd,bskd->bkgqs", q5, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        sc = logit_softcap * jnp.tanh(sc / logit_softcap)
    i = jnp.arange(s)[:, None]
    j = jnp.arange(s)[None, :]
    ok = j <= i
    if sliding_window is not None:
        ok = ok & (i - j < sliding_window)
    ok = ok[None, None, None] & mask_bs.astype(bool)[:, None, None, None, :]
    p = jax.nn.softmax(jnp.where(ok, sc, MASK_VALUE), axis=-1).astype(q.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=q.dtype).reshape(b, s, h, d)


def cudnn(q, k, v, mask_bs, scale, *, logit_softcap=None, sliding_window=None):
    del logit_softcap, mask_bs  # cuDNN has no soft-cap; the mask is all ones here
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                        implementation="cudnn")


def tokamax_mosaic(q, k, v, mask_bs, scale, *, logit_softcap=None, sliding_window=None):
    import tokamax  # noqa: PLC0415 -- only this implementation needs it
    from absl import flags  # noqa: PLC0415
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would otherwise parse this script's argv
        flags.FLAGS.mark_as_parsed()
    del mask_bs  # all ones here
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                         logits_soft_cap=logit_softcap, implementation="mosaic")


IMPLS = {"blockwise": fa.flash_attention_reference, "kernel": fa.flash_attention, "dense": dense,
         "cudnn": cudnn, "tokamax": tokamax_mosaic}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def visible_pairs(s: int, window) -> int:
    rows = np.arange(s)
    return int(np.minimum(rows + 1, window if window else s).sum())


def time_ms(fn, args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="", help="substring of the config names to run")
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--batch", default="", help="seq:batch pairs overriding the defaults, e.g. 2048:2,32768:1")
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"--impls: {unknown} not among {sorted(IMPLS)}")
    batch_of = dict(BATCH)
    batch_of.update({int(a): int(b) for a, b in (p.split(":") for p in args.batch.split(",") if p)})
    dev = jax.devices()[0]
    for name, h, hk, d, cap, window in CONFIGS:
        if args.only not in name:
            continue
        for s in map(int, args.seqs.split(",")):
            b = batch_of.get(s, 1)
            rng = np.random.default_rng(s + d)
            q = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16)
            k = jnp.asarray(rng.standard_normal((b, s, hk, d)), jnp.bfloat16)
            v = jnp.asarray(rng.standard_normal((b, s, hk, d)), jnp.bfloat16)
            do = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16)
            mask = jnp.ones((b, s), jnp.int32)
            scale = d ** -0.5
            flops_fwd = 4 * b * h * d * visible_pairs(s, window)
            base = {"bench": "flash_attention", "device": dev.device_kind, "config": name, "batch": b, "seq": s,
                    "q_heads": h, "kv_heads": hk, "head_dim": d, "logit_softcap": cap, "sliding_window": window,
                    "kernel_runs": jax.default_backend() == "gpu" and fa.supported(q, k, v)}
            ref_out = None
            cudnn_ref = {}  # pass -> outputs of cuDNN, for tokamax's rel_l2_vs_cudnn
            for impl in impls:
                op = IMPLS[impl]
                if impl == "dense" and s > 8192:
                    continue
                f = lambda q_, k_, v_, op=op: op(q_, k_, v_, mask, scale, logit_softcap=cap, sliding_window=window)
                fwd = jax.jit(f)

                def fwd_bwd(q_, k_, v_, do_, f=f):
                    out, vjp = jax.vjp(f, q_, k_, v_)
                    return out, vjp(do_)

                fwd_bwd = jax.jit(fwd_bwd)
                for pass_name, fn, fargs, flops in (("fwd", fwd, (q, k, v), flops_fwd),
                                                    ("fwd_bwd", fwd_bwd, (q, k, v, do), 3.5 * flops_fwd)):
                    line = dict(base, impl=impl, **{"pass": pass_name})
                    if impl == "cudnn" and cap is not None:
                        line["note"] = "no soft-cap (cuDNN has none): speed context only"
                    try:
                        ms = time_ms(fn, fargs, args.reps)
                        line.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                        if impl in ("cudnn", "tokamax") and cap is None:
                            got = jax.tree.leaves(fn(*fargs))
                            if impl == "cudnn":
                                cudnn_ref[pass_name] = got
                            elif pass_name in cudnn_ref:
                                line["rel_l2_vs_cudnn"] = max(rel_l2(g, r) for g, r in zip(got, cudnn_ref[pass_name]))
                        if pass_name == "fwd" and impl in ("blockwise", "kernel"):
                            out = np.asarray(fwd(q, k, v), np.float32)
                            if impl == "blockwise":
                                ref_out = out
                            elif ref_out is not None:
                                line["rel_l2_vs_blockwise"] = rel_l2(out, ref_out)
                    except Exception as e:  # noqa: BLE001 -- reported, the benchmark goes on
                        line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
