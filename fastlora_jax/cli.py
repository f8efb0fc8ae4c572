"""The `fastlora-jax` command line.

`fastlora-jax demo` is the README's main job on the embedded default: it builds a tiny random Llama
checkpoint locally (no hub needed), loads it with NF4 quantization exactly as bitsandbytes would, and runs it.
`fastlora-jax train` fine-tunes a LoRA adapter on a JSONL dataset (trainer.SFTTrainer) and writes PEFT's
adapter files; `fastlora-jax export` turns an adapter into a merged 16-bit Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(args) -> int:
    """The main job on the embedded default: QLoRA fine-tune of a tiny local Llama on the bundled chat
    data, with the progress bar, ending in a PEFT adapter (and a generation from it)."""
    import jax

    from fastlora_jax import FastLanguageModel
    from fastlora_jax.data import bundled_dataset_path
    from fastlora_jax.tiny import write_tiny_llama
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"building the embedded default model in {model_dir} ...")
        write_tiny_llama(model_dir, seed=0)
    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir.resolve()), max_seq_length=256,
                                                         load_in_4bit=True)
    print(f"loaded {model} in {time.perf_counter() - start:.1f}s on {jax.default_backend()}")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    model.print_trainable_parameters()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=str(bundled_dataset_path()),
                         args=SFTConfig(output_dir=args.output_dir, per_device_train_batch_size=4,
                                        gradient_accumulation_steps=2, max_steps=args.max_steps,
                                        learning_rate=1e-2, warmup_steps=5, logging_steps=10, save_steps=20,
                                        assistant_only_loss=True, seed=3407))
    result = trainer.train()
    logged = [h["loss"] for h in trainer.history if "loss" in h]
    first, last = logged[0], logged[-1]
    print(f"trained {result.global_step} steps: loss {first:.3f} (first log) -> {last:.3f} (last log)")
    FastLanguageModel.for_inference(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = model.generate([ids], max_new_tokens=16, temperature=0.0)
    print(f"generated: {tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)!r}")
    adapter = Path(args.output_dir).resolve()
    print(_demo_summary(adapter, model_dir.resolve(), result.global_step, first, last))
    return 0


def _demo_summary(adapter: Path, model_dir: Path, steps: int, first_loss: float, last_loss: float) -> str:
    """What the demo did and what to do next, in a few lines (the end of `make demo`)."""
    return "\n".join([
        "",
        "== demo done ==",
        f"- a LoRA adapter (PEFT's files) trained for {steps} steps is in {adapter}",
        f"- the training loss went from {first_loss:.3f} (first logged step) to {last_loss:.3f} (last);"
        " a random tiny model learns the bundled chats' format, not facts",
        "- load it in PyTorch: from peft import PeftModel; from transformers import AutoModelForCausalLM",
        f"    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(model_dir)!r}), {str(adapter)!r})",
        "- a real model: fastlora-jax train --model meta-llama/Llama-3.2-1B-Instruct --data my_chats.jsonl"
        " --output-dir outputs   (a local directory or a hub id in the huggingface_hub cache)",
        "- in Python: the README's 'Fine-tune in Python'; the notebook notebooks/qlora_quickstart.ipynb",
    ])


DEFAULT_MODEL_DIR = "runs/tiny-llama"


def _gradient_checkpointing(value: str):
    mapping = {"unsloth": "unsloth", "true": True, "false": False}
    if value.lower() not in mapping:
        raise argparse.ArgumentTypeError(f"use 'unsloth', 'true' or 'false'; got {value!r}")
    return mapping[value.lower()]


class _SayWhereTrainingStarts:
    def on_train_begin(self, trainer):
        if trainer.resumed_from is not None:
            print(f"resumed from {trainer.resumed_from[0]} (step {trainer.resumed_from[1]})", flush=True)


def train(args) -> int:
    import jax

    from fastlora_jax import FastLanguageModel, sharding
    from fastlora_jax.data import bundled_dataset_path
    from fastlora_jax.tiny import write_tiny_llama
    from fastlora_jax.trainer import SFTConfig, SFTTrainer, train_on_responses_only

    # A multi-host run (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set): jax.distributed first.
    sharding.initialize_distributed()
    mesh = None
    if args.mesh is not None:
        try:
            mesh = sharding.resolve_mesh(args.mesh)
        except ValueError as err:
            raise ValueError(f"--mesh {args.mesh!r}: {err}") from None
    data = args.data or str(bundled_dataset_path())
    for flag, path in (("--data", data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path!r} is not a file")
    model_dir = Path(args.model).expanduser()
    if args.model == DEFAULT_MODEL_DIR and not (model_dir / "config.json").is_file():
        if sharding.is_writer():  # several processes: one builds it, the others wait for it
            print(f"building the embedded default model in {model_dir} ...")
            write_tiny_llama(model_dir, seed=0)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("fastlora-jax: default model built")
    # An absolute path: adapter_config.json's base_model_name_or_path must resolve from anywhere.
    model_name = str(model_dir.resolve()) if model_dir.is_dir() else args.model
    model, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=args.max_seq_length,
                                                         dtype=args.dtype, load_in_4bit=args.load_in_4bit, mesh=mesh)
    targets = "all-linear" if args.target_modules.strip() == "all-linear" else \
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
    model = FastLanguageModel.get_peft_model(
        model, r=args.r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.r,
        lora_dropout=args.lora_dropout, target_modules=targets, use_gradient_checkpointing=args.gradient_checkpointing,
        random_state=args.seed, max_seq_length=args.max_seq_length)
    config = SFTConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps if args.max_steps else -1,
        num_train_epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, seed=args.seed,
        packing=args.packing, dataset_text_field=args.dataset_text_field,
        eval_strategy="steps" if args.eval_data and args.eval_steps else "no", eval_steps=args.eval_steps,
        max_seq_length=args.max_seq_length, disable_tqdm=args.quiet,
        report_to=[t.strip() for t in args.report_to.split(",") if t.strip()], mesh=mesh)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, eval_dataset=args.eval_data,
                         args=config)
    if args.train_on_responses_only or args.response_part:
        train_on_responses_only(trainer, instruction_part=args.instruction_part, response_part=args.response_part)
    model.print_trainable_parameters()
    d = trainer.train_data
    print(f"data: {d.num_examples} examples -> {d.num_rows} rows of {d.seq_len} tokens; "
          f"{trainer.max_steps} steps of {trainer.rows_per_step} rows; mesh {sharding.describe(trainer.mesh)}")
    resume = args.resume
    resume = True if resume == "last" else resume
    trainer.callbacks.append(_SayWhereTrainingStarts())
    result = trainer.train(resume_from_checkpoint=resume)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.metrics.items()}
    print(f"done: step {result.global_step}, training loss {result.training_loss:.4f}; {summary}")
    print(f"adapter written to {Path(args.output_dir).resolve()}")
    return 0


def export(args) -> int:
    from fastlora_jax import FastLanguageModel

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        print(f"error: --adapter {args.adapter!r} is not an adapter directory (no adapter_config.json)",
              file=sys.stderr)
        return 2
    # The merge reads the base's original 16-bit weights; no need to quantize it on the way.
    model, tokenizer = FastLanguageModel.from_pretrained(str(adapter), dtype=args.dtype, load_in_4bit=False)
    method = "merged_16bit" if args.merged else "lora"
    if args.gguf:  # llama.cpp / Ollama: model.<TYPE>.gguf (+ Modelfile), or adapter.<TYPE>.gguf without --merged
        paths = model.save_pretrained_gguf(args.output, tokenizer, quantization_method=args.gguf.split(","),
                                           save_method=method)
        print(f"GGUF written: {', '.join(str(p.resolve()) for p in paths)}")
        return 0
    model.save_pretrained_merged(args.output, tokenizer, save_method=method)
    what = "merged 16-bit checkpoint" if args.merged else "adapter"
    print(f"{what} written to {Path(args.output).resolve()}")
    return 0


def main(argv=None) -> int:
    parser = _Parser(prog="fastlora-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="the main job on the embedded tiny model")
    p.add_argument("--model-dir", default="runs/tiny-llama", help="where the tiny model is built (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/demo-adapter", help="where the adapter goes (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=60)
    p.set_defaults(func=demo)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter on a JSONL dataset (SFTTrainer)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR,
                   help="a Hugging Face model directory or hub id (the default is built locally if missing)")
    p.add_argument("--data", default=None, help="training data: JSONL with messages / text / prompt+completion "
                                                 "(default: the bundled tiny_chat.jsonl)")
    p.add_argument("--eval-data", default=None, help="evaluation data (JSONL)")
    p.add_argument("--output-dir", default="outputs", help="adapter files and checkpoints/ go here")
    p.add_argument("--max-steps", type=int, default=60, help="optimizer steps (0: train --epochs epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs, when --max-steps is 0")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=2, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=4, help="gradient_accumulation_steps")
    p.add_argument("--warmup-steps", type=float, default=5)
    p.add_argument("--lr-scheduler-type", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: r)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names, or all-linear")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True,
                   help="QLoRA: quantize the base to NF4")
    p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on a GPU, float32 elsewhere)")
    p.add_argument("--gradient-checkpointing", type=_gradient_checkpointing, default="unsloth",
                   help="unsloth, true or false")
    p.add_argument("--packing", action="store_true", help="pack short examples into full rows")
    p.add_argument("--dataset-text-field", default="text")
    p.add_argument("--train-on-responses-only", action="store_true",
                   help="loss on assistant replies only (chat data)")
    p.add_argument("--instruction-part", default=None, help="with --response-part: Unsloth's markers")
    p.add_argument("--response-part", default=None)
    p.add_argument("--logging-steps", type=float, default=1)
    p.add_argument("--eval-steps", type=float, default=None)
    p.add_argument("--save-steps", type=float, default=500)
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--resume", nargs="?", const="last", default=None,
                   help="resume from the last checkpoint in --output-dir (or from the given checkpoint path)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report-to", default="none",
                   help="none, tensorboard, wandb, all, or a comma-separated list (SFTConfig.report_to)")
    p.add_argument("--mesh", default=None, metavar="data=N,fsdp=M",
                   help="devices: data parallel x FSDP (e.g. data=2,fsdp=2; auto: every device on data). Default: "
                        "every device on data, the base loaded on one device first; with --mesh it loads straight "
                        "into its shards. Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    p.set_defaults(func=train)

    p = sub.add_parser("export", help="save an adapter as a merged 16-bit Hugging Face checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="an adapter directory (adapter_config.json + weights)")
    p.add_argument("--output", required=True, help="where to write")
    p.add_argument("--merged", action="store_true",
                   help="merge W + s*B*A into a plain HF checkpoint (otherwise: copy the adapter)")
    p.add_argument("--dtype", default=None, help="dtype of the merged weights (default: bfloat16 on a GPU, "
                                                 "float32 elsewhere)")
    p.add_argument("--gguf", default=None, metavar="METHOD",
                   help="write GGUF for llama.cpp/Ollama instead: f16, bf16, f32, q8_0 (comma-separated for several; "
                        "q4_k_m etc. need llama-cpp-python)")
    p.set_defaults(func=export)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- every failure is one line and exit 2; the message names the cause
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """An exception as one line: its message (and notes), prefixed by its type unless that is a plain
    ValueError or FileNotFoundError, whose messages already say what was wrong with which argument or file."""
    text = " ".join([str(err) or repr(err)] + list(getattr(err, "__notes__", [])))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if type(err) in (ValueError, FileNotFoundError):
        return text
    return f"{type(err).__name__}: {text}"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2, as argparse does)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


if __name__ == "__main__":
    sys.exit(main())
