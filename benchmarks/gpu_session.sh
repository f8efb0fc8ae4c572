#!/usr/bin/env bash
# One GPU-machine session: install without network, run `pytest -m gpu`, then the benchmarks given as
# arguments (e.g. "load"). Logs go to $OUT; a short table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
memdump_tar() {  # the largest compiled step's scheduled HLO, buffer assignment, usage report and live ranges,
  # as ONE file (a call brings back at most 8 files)
  local hlo; hlo=$(ls -S "$1"/*jit_step*after_optimizations.txt | head -1)
  tar -czf "$OUT/memdump_$2.tgz" -C "$1" $(cd "$1" && ls "$(basename ${hlo%.txt})"*.txt)
}
prof_tar() {  # the profiles' compiled HLO and per-kernel times as ONE file (a call brings back at most 8 files)
  (cd "$OUT" && ls hlo_*.txt kernels_*.json >/dev/null 2>&1 && tar -czf "prof_$(date +%H%M%S).tgz" hlo_*.txt kernels_*.json && rm -f hlo_*.txt kernels_*.json)
}
for job in "$@"; do
  case "$job" in
    test|test-nf4|test-rest) # `pytest -m gpu`: whole (`test`) it no longer fits one call (588 s in session 10; session 11
          # hit the 600 s limit on the last test), so a session runs `test-nf4` (the fused NF4 kernel's 58 tests) in one
          # call and `test-rest` (the other files) in the next; the 25 slowest go into the log
          case "$job" in test) files=tests ;; test-nf4) files=tests/test_nf4_matmul.py ;;
                         *) files="tests --deselect tests/test_nf4_matmul.py" ;; esac
          python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors --durations=25 $files 2>&1 | tee "$OUT/pytest_gpu_$job.log" | tail -15
          [ "${PIPESTATUS[0]}" = 0 ] || tests_failed=1 ;;
    load8b) python3 benchmarks/load_checkpoint.py --shape llama-3.1-8b --dir /tmp/ckpt 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    gc8k) python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 8192 --gc true unsloth false --timeout 170 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    gc4k) python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 4096 --gc true unsloth false --timeout 150 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    peers) # ours and Unsloth in one invocation (.peers carried), 8B first; PROFILE=2 profiles ours (one tarball)
           python3 benchmarks/train_step.py --vs-unsloth --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth false --timeout 150 ${PROFILE:+--profile $PROFILE} 2>&1 | tee -a "$OUT/bench.jsonl"
           python3 benchmarks/train_step.py --vs-unsloth --shape llama-3.2-1b --batch 4 --seq 2048 --gc unsloth false --timeout 150 ${PROFILE:+--profile $PROFILE} 2>&1 | tee -a "$OUT/bench.jsonl"
           prof_tar ;;
    lean32k) # the long-context lean point as shipped (MLP in sequence tiles of 8192)
           python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 32768 --gc unsloth --mlp-tile-tokens 8192 --steps 3 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    prof) python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 2 --seq 2048 --gc false unsloth --profile 2 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          python3 benchmarks/train_step.py --shape llama-3.2-1b --batch 4 --seq 2048 --gc false unsloth --profile 2 --timeout 150 2>&1 | tee -a "$OUT/bench.jsonl"
          prof_tar ;;
    prof32k) # the long-context lean point (MLP in sequence tiles of 8192), one profiled step
          python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 32768 --gc unsloth --mlp-tile-tokens 8192 --steps 2 --profile 1 --timeout 240 2>&1 | tee -a "$OUT/bench.jsonl"
          prof_tar ;;
    deq) # what the training step's NF4 path costs per op: one-pass dequantize (+ lean select tree) then cuBLAS, the
         # dequantize alone (GB/s), and cuBLAS on a dense W
         python3 benchmarks/nf4_matmul.py --models llama-3.1-8b llama-3.2-1b --m 4096 --reps 5 --impls xla_onepass xla_onepass_lean dequant dequant_lean dense 2>&1 | grep '^{' | tee -a "$OUT/bench.jsonl" ;;
    pipe) # XLA's pipelined host offloading (not in the step's options: measured slower in session 9) against without
          T="python3 benchmarks/train_step.py"; ON="--xla-option xla_gpu_enable_pipelined_host_offloading=true"
          for opt in "" "$ON"; do
            $T --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth --lean-offload layer_input $opt --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          done ;;
    pgle) # the step's schedule from a measured profile (JAX's PGLE: XLA's scheduler otherwise prices a host copy at HBM
          # speed and hides it behind one kernel) against the default, "unsloth" mode
          T="python3 benchmarks/train_step.py"; PG="env JAX_ENABLE_PGLE=true JAX_PGLE_PROFILING_RUNS=2"
          $PG $T --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth --lean-offload layer_input --profile 2 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          $PG $T --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth --lean-offload attention --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          $T --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth --lean-offload layer_input --xla-option xla_gpu_enable_command_buffer= --profile 2 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          $PG $T --shape llama-3.2-1b --batch 4 --seq 2048 --gc unsloth --timeout 150 2>&1 | tee -a "$OUT/bench.jsonl"
          $PG $T --shape llama-3.1-8b --batch 1 --seq 32768 --gc unsloth --lean-offload attention --mlp-tile-tokens 8192 --steps 3 --timeout 240 2>&1 | tee -a "$OUT/bench.jsonl"
          prof_tar ;;
    cmdbuf) # XLA's command buffers put the host-offload copies on the compute stream (exposed); without them, or
          # without one command type, the copies run on their own streams (an XLA_FLAGS setting of the option is
          # kept by training.step_compiler_options, so the first run measures what XLA_FLAGS says)
          T="python3 benchmarks/train_step.py"; NOCB="--xla-option xla_gpu_enable_command_buffer="
          XLA_FLAGS="--xla_gpu_enable_command_buffer=-DYNAMIC_SLICE_FUSION" $T --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth --lean-offload layer_input --profile 2 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          $T --shape llama-3.1-8b --batch 2 --seq 2048 --gc unsloth --lean-offload attention $NOCB --profile 2 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          $T --shape llama-3.2-1b --batch 4 --seq 2048 --gc unsloth $NOCB --timeout 150 2>&1 | tee -a "$OUT/bench.jsonl"
          $T --shape llama-3.1-8b --batch 1 --seq 32768 --gc unsloth --lean-offload attention --mlp-tile-tokens 8192 $NOCB --steps 3 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          prof_tar ;;
    lookup-*) spec=${job#lookup-}; shape=${spec%:*}; batch=${spec#*:}
          # the memory-lean NF4 lookup: the select tree (the "auto" default there) against the indexed table load
          for lookup in select table; do
            python3 benchmarks/train_step.py --shape $shape --batch $batch --seq 2048 --gc unsloth --nf4-lookup $lookup --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          done ;;
    cb32k) # the long-context lean point with the host-offload step options (training.HOST_OFFLOAD_STEP_OPTIONS) and
           # with XLA's default command buffers (DYNAMIC_SLICE_FUSION recorded too)
          for cb in "" "--xla-option xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,DYNAMIC_SLICE_FUSION"; do
            python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq 32768 --gc unsloth --mlp-tile-tokens 8192 --steps 3 $cb --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
          done ;;
    unrolldump) # XLA's buffer assignment of Llama-3.2-1B 4 x 2048 False, scanned and unrolled (why the unrolled peak is higher)
           for flag in "" --unroll-layers; do dump=/tmp/xla_dump_1b${flag}
             XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump --xla_dump_hlo_module_re=jit_step" \
               python3 benchmarks/train_step.py --shape llama-3.2-1b --batch 4 --seq 2048 --gc false $flag --steps 2 --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
             memdump_tar "$dump" "1b${flag}"; done ;;
    unroll) # the decoder layers as a Python loop (KernelOptions.unroll_layers, False mode only) against the scan, one process each
           for spec in "llama-3.1-8b 2" "llama-3.2-1b 4"; do set -- $spec
             for flag in "" --unroll-layers; do
               python3 benchmarks/train_step.py --shape $1 --batch $2 --seq 2048 --gc false $flag --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"; done
           done ;;
    flash) python3 benchmarks/flash_attention.py 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    tokamax) # tokamax's Mosaic GPU attention (fwd and bwd kernels) against cuDNN at the Llama shapes (.whl carried:
             # tokamax and its pure-Python needs, benchmarks/README.md "Session 15")
          ( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
              && mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py \
              && echo "get_kernel_stats_tool = None  # stub: tokamax.benchmarking is not used" > /tmp/site/xprof/cli/tools.py \
              && export PYTHONPATH=/tmp/site \
              && python3 benchmarks/flash_attention.py --only llama-d --impls cudnn,tokamax --seqs 2048,8192,32768 \
                   --batch 2048:4,8192:1 --reps 10 ) 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    saves) # KernelOptions.false_mode_saves under False (none, the LoRA x @ A^T, also the normed inputs; the last also
           # unrolled), one process each; PEERS=1 adds Unsloth without checkpointing to the last row of each shape
           for spec in "llama-3.1-8b 2" "llama-3.2-1b 4"; do set -- $spec
             T="python3 benchmarks/train_step.py --shape $1 --batch $2 --seq 2048 --gc false --timeout 200"
             for saves in "" lora_xa lora_xa,normed_inputs; do $T --false-saves "$saves" 2>&1 | tee -a "$OUT/bench.jsonl"; done
             $T --false-saves lora_xa,normed_inputs --unroll-layers ${PEERS:+--vs-unsloth} 2>&1 | tee -a "$OUT/bench.jsonl"
           done ;;
    fast1b) # the 1B fastest mode against Unsloth without checkpointing, three invocations (issue 15's median rule;
            # .peers carried)
            for i in 1 2 3; do
              python3 benchmarks/train_step.py --vs-unsloth --shape llama-3.2-1b --batch 4 --seq 2048 --gc false \
                --unroll-layers --false-saves lora_xa,normed_inputs --timeout 170 2>&1 | tee -a "$OUT/bench.jsonl"
            done ;;
    unroll1b) python3 benchmarks/train_step.py --shape llama-3.2-1b --batch 4 --seq 2048 --gc false --unroll-layers --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    mllama) python3 benchmarks/vl_train_step.py --shape llama-3.2-11b-vision --seq 2048 --tiles 4 --gc unsloth --timeout 280 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    tiles-*) spec=${job#tiles-}; shape=${spec%:*}; batch=${spec#*:}
             # the memory-lean row tiles of large dequantized weights (default 128 MiB) against whole weights
             for mib in 128 100000; do
               python3 benchmarks/train_step.py --shape $shape --batch $batch --seq 2048 --gc unsloth --compile-first --lean-tile-mib $mib --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
             done ;;
    longctx-*) spec=${job#longctx-}; seq=${spec%:*}; tiles="0 8192"; [ "$spec" != "$seq" ] && tiles=${spec#*:}
             # Llama-3.1-8B, batch 1, long context: the MLP untiled (0) against sequence tiles of 8192 tokens
             # (KernelOptions.mlp_tile_tokens). longctx-32768 runs both; a step at 131072 takes ~47 s, so run
             # longctx-131072:0 and longctx-131072:8192 as two calls (600 s each).
             steps=5; timeout=280; [ "$seq" -gt 32768 ] && steps=1
             [ "$tiles" = "${tiles% *}" ] && timeout=540
             for tile in $tiles; do
               python3 benchmarks/train_step.py --shape llama-3.1-8b --batch 1 --seq $seq --gc unsloth --compile-first --mlp-tile-tokens $tile --steps $steps --timeout $timeout 2>&1 | tee -a "$OUT/bench.jsonl"
             done ;;
    gemma3v) python3 benchmarks/vl_train_step.py --shape gemma-3-4b --seq 2048 --gc unsloth --timeout 280 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    families) for spec in "qwen3-8b 2" "gemma-3-1b 4" "phi-4 1"; do set -- $spec
                python3 benchmarks/train_step.py --vs-unsloth --shape $1 --batch $2 --seq 2048 --gc unsloth --timeout 240 2>&1 | tee -a "$OUT/bench.jsonl"
              done ;;
    family-*) spec=${job#family-}; shape=${spec%:*}; batch=${spec#*:}
              python3 benchmarks/train_step.py --vs-unsloth --shape $shape --batch $batch --seq 2048 --gc unsloth --timeout 280 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    longest-*) spec=${job#longest-}; system=${spec%%:*}; range=${spec#*:}
              # the longest Llama-3.1-8B sequence that trains one step, by bisection (issue 15), e.g.
              # longest-ours:131072:524288 and longest-unsloth:131072:524288 (.peers carried); one try per process
              python3 benchmarks/longest_seq.py --system $system --lo ${range%%:*} --hi ${range#*:} --timeout 280 --budget 520 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    link) python3 -c "from fastlora_jax import training; f, b = training.measured_device_rates(); print(f'{{\"bench\": \"device_rates\", \"matmul_tflops\": {f/1e12:.1f}, \"to_host_gb_s\": {b/1e9:.1f}, \"flops_per_host_byte\": {f/b:.0f}}}')" 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    offload-*) spec=${job#offload-}; IFS=: read -r shape batch seq tile <<< "$spec"
              # "unsloth" offloading the layer input only against the attention half too (KernelOptions.lean_offload),
              # then Unsloth's default in the same invocation (.peers carried); e.g. offload-llama-3.1-8b:2:2048,
              # offload-llama-3.1-8b:1:32768:8192 (the MLP in sequence tiles of 8192 tokens)
              steps=5; [ "$seq" -gt 8192 ] && steps=3
              python3 benchmarks/train_step.py --shape $shape --batch $batch --seq $seq --gc unsloth --lean-offload layer_input --mlp-tile-tokens ${tile:-0} --steps $steps --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl"
              python3 benchmarks/train_step.py --shape $shape --batch $batch --seq $seq --gc unsloth --lean-offload attention --mlp-tile-tokens ${tile:-0} --steps $steps --timeout 200 ${PEERS:+--vs-unsloth} 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    lean-*) spec=${job#lean-}; shape=${spec%:*}; batch=${spec#*:}
              # ours alone, memory-lean mode, 2048 tokens a row
              python3 benchmarks/train_step.py --shape $shape --batch $batch --seq 2048 --gc unsloth --timeout 200 2>&1 | tee -a "$OUT/bench.jsonl" ;;
    memdump-*) spec=${job#memdump-}; shape=${spec%:*}; batch=${spec#*:}; dump=/tmp/xla_dump_$shape
              # XLA's buffer assignment of the compiled step (what is live at the peak), for memory work
              XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump --xla_dump_hlo_module_re=jit_step" \
                python3 benchmarks/train_step.py --shape $shape --batch $batch --seq 2048 --gc unsloth --steps 2 --timeout 280 2>&1 | tee -a "$OUT/bench.jsonl"
              memdump_tar "$dump" "$shape" ;;
    vlmemdump-*) shape=${job#vlmemdump-}; dump=/tmp/xla_dump_$shape
              # the same dump for a VLM step, language-only LoRA (Mllama: 4 tiles)
              XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump --xla_dump_hlo_module_re=jit_step" \
                python3 benchmarks/vl_train_step.py --shape $shape --seq 2048 --tiles 4 --modes language-only --gc unsloth --steps 2 --timeout 280 2>&1 | tee -a "$OUT/bench.jsonl"
              memdump_tar "$dump" "$shape" ;;
    *) echo "unknown job $job" ;;
  esac
done
echo "== results"; grep -h '^{' "$OUT"/bench.jsonl 2>/dev/null; for log in "$OUT"/pytest_gpu_*.log; do
  [ -e "$log" ] && echo "$(basename "$log"): $(grep -h "passed\|failed" "$log" | tail -1)"; done
exit "${tests_failed:-0}"  # a failing `pytest -m gpu` fails the call
