"""The `fastlora-jax` command line.

`fastlora-jax demo` is the README's main job on the embedded default: it builds a tiny random Llama
checkpoint locally (no hub needed), loads it with NF4 quantization exactly as bitsandbytes would, and runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(args) -> int:
    import jax
    import numpy as np

    from fastlora_jax import FastLanguageModel
    from fastlora_jax.tiny import write_tiny_llama

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"building the embedded default model in {model_dir} ...")
        write_tiny_llama(model_dir, seed=0)
    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256, load_in_4bit=True)
    print(f"loaded {model} in {time.perf_counter() - start:.1f}s on {jax.default_backend()}")

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    logits = np.asarray(model(ids).logits, dtype=np.float32)
    next_ids = logits[0].argmax(-1)
    print(f"prompt tokens: {len(ids)}; logits {logits.shape}; mean next-token loss "
          f"{-np.mean(_log_softmax(logits[0, :-1])[np.arange(len(ids) - 1), ids[1:]]):.3f} "
          f"(random weights: about ln(vocab) = {np.log(model.config.vocab_size):.3f})")
    print(f"greedy next token after the prompt: {tokenizer.decode([int(next_ids[-1])])!r}")
    return 0


def _log_softmax(x):
    import numpy as np
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job on the embedded tiny model")
    p.add_argument("--model-dir", default="runs/tiny-llama", help="where the tiny model is built (default: %(default)s)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
