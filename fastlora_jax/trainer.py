"""`SFTTrainer`: TRL's SFTTrainer for `FastLanguageModel` LoRA models, in JAX.

    from fastlora_jax import FastLanguageModel
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained("runs/tiny-llama", max_seq_length=512)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset="data.jsonl",
                         args=SFTConfig(output_dir="outputs", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=4, max_steps=60, learning_rate=2e-4))
    trainer.train()                                # or .train(resume_from_checkpoint=True)
    # outputs/ now holds adapter_config.json + adapter_model.safetensors (PEFT's files)

Training runs the jitted step of `training.make_train_step` (compiled once: every batch has the shape
`[gradient_accumulation_steps, per_device_train_batch_size, seq]`) on AdamW from `training.make_optimizer`.

Vision-language models train as Unsloth's notebooks do it, with a `data_collator` that processes the images of
each batch (the records are kept as they are, no tokenization up front):

    model, processor = FastVisionModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", load_in_4bit=True)
    model = FastVisionModel.get_peft_model(model, r=16, finetune_vision_layers=True)
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=UnslothVisionDataCollator(model, processor),
                         train_dataset=records,   # [{"messages": [...image and text parts...]}, ...]
                         args=SFTConfig(output_dir="outputs", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=4, max_steps=30, learning_rate=2e-4,
                                        remove_unused_columns=False, dataset_text_field="",
                                        dataset_kwargs={"skip_prepare_dataset": True}))

Each step's records (the same rows as for text data, see `CollatedData`) go through the collator one micro-batch
at a time, and the micro-batches go to the train step as a list (their patch counts differ, so they are not
stacked; `training.make_train_step` says how that list is run). The step compiles once per distinct shape of
the micro-batch (sequence length, number of image patches): the collator's `pad_to_multiple_of` and images of
one size keep that count low.

Resuming loses nothing. Everything a step depends on is either in the checkpoint or a pure function of
the step number: the checkpoint (orbax, `output_dir/checkpoints/<step>`, written to a temporary directory
and renamed when complete) holds the LoRA params, the optimizer state (moments, step count), the step,
the data position, the seed and the log history; the batch of step `s` is a function of
`(data_seed, s)` (data.py: the epoch's permutation comes from `(data_seed, epoch)`), and its LoRA-dropout
key is `fold_in(key(seed), s)`. A run killed at any point and resumed from its last checkpoint therefore
ends with exactly the LoRA params of an uninterrupted run.

A checkpoint is saved synchronously: it is complete when the step that saved it returns, so a kill at any
moment after step N's save leaves N resumable. It also records the LoRA config, the base model's identity and
the optimizer's settings; a resume whose LoRA config or base model differs is refused (naming both values:
restored into another config the tensors would be cut to fit), and changed optimizer or data settings warn.
A non-finite loss or gradient norm stops training before that step's params are saved.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax import sharding, training
from fastlora_jax.data import IGNORE_INDEX, DataOptions, SFTData, build_rows, load_records, pad_token_id_of, \
    tokenize_records

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
# HF/TRL optimizer names accepted; all run optax AdamW with fp32 moments.
OPTIMIZERS = {"adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_jax", "adamw_8bit",
              "paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit"}
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_VERSION = 2  # 2: the LoRA config, the model's identity and the optimizer's settings are recorded
READABLE_VERSIONS = (1, 2)
TRAINER_STATE = "trainer_state.json"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite real number: NaN fails every comparison, so a range check alone would let it through."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class TrainingArguments:
    """TRL's `SFTConfig` / HF's `TrainingArguments`: the same names and meanings, the subset that applies.

    `max_steps > 0` overrides `num_train_epochs`. `warmup_steps` in (0, 1) is a ratio of the total steps
    (HF 5); `warmup_ratio` is also accepted. `logging_steps`, `eval_steps` and `save_steps` in (0, 1) are
    ratios of the total steps, as in HF. `max_seq_length` (Unsloth's name) or `max_length` (TRL's) default
    to the model's `max_seq_length`. `optim` names of AdamW variants are accepted; all run optax AdamW with
    fp32 moments. `report_to` ("none", "tensorboard", "wandb", "all" or a list) and `logging_dir` (TensorBoard's
    event directory, default `output_dir/runs/<time>_<host>`) send the logs to reporting.py's writers; `run_name`
    names the W&B run. `fp16`, `bf16`, `dataset_num_proc`, `remove_unused_columns` are accepted and ignored
    (the compute dtype is the model's; records are never stripped of columns).
    `dataset_kwargs={"skip_prepare_dataset": True}` and `dataset_text_field=""` are what Unsloth's vision
    notebooks set along with a `data_collator`: the records go to the collator untouched.
    `mesh` (fastlora_jax.sharding): None trains on the model's mesh (`from_pretrained(mesh=...)`), or, for a model
    loaded without one, on every device along the data axis (one device: nothing changes); a spec such as
    "data=2,fsdp=2" or a `jax.sharding.Mesh` names it (the model is then placed on it, `CausalLM.shard`); "none"
    is one device even where there are several. As in HF, `per_device_*_batch_size` is per device: a step's
    micro-batch is that times the mesh size.
    """
    output_dir: str = "trainer_output"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    learning_rate: float = 2e-5
    warmup_steps: float = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch"
    logging_steps: float = 10
    eval_strategy: str = "no"
    eval_steps: float | None = None
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    seed: int = 42
    data_seed: int | None = None
    # data (SFTConfig)
    max_seq_length: int | None = None
    max_length: int | None = None
    packing: bool = False
    packing_strategy: str = "bfd"
    pad_to_multiple_of: int | None = 8
    dataset_text_field: str = "text"
    assistant_only_loss: bool = False
    completion_only_loss: bool | None = None
    # TRL's switch for collators that take raw records (vision): {"skip_prepare_dataset": True}
    dataset_kwargs: dict | None = None
    # output
    disable_tqdm: bool = False
    # reporting (reporting.py): "none", "tensorboard", "wandb", "all" or a list of them
    report_to: Any = "none"
    logging_dir: str | None = None
    # devices (fastlora_jax.sharding): None, "data=N,fsdp=M", "auto", "none" or a jax.sharding.Mesh
    mesh: Any = None
    # accepted for compatibility, ignored
    fp16: bool = False
    bf16: bool = False
    dataset_num_proc: int | None = None
    run_name: str | None = None
    remove_unused_columns: bool = True

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"{name}={getattr(self, name)!r} is not accepted: {rule}")

        if not isinstance(self.output_dir, (str, Path)) or not str(self.output_dir):
            bad("output_dir", "must be a directory path")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                bad(name, "must be a positive int")
        if not _is_int(self.max_steps) or (self.max_steps <= 0 and self.max_steps != -1):
            bad("max_steps", "must be a positive int, or -1 to train num_train_epochs epochs")
        if self.max_steps == -1 and (not _is_number(self.num_train_epochs) or self.num_train_epochs <= 0):
            bad("num_train_epochs", "must be positive (or set max_steps)")
        if not _is_number(self.learning_rate) or not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            bad("learning_rate", "must be a positive number")
        if not _is_number(self.warmup_steps) or self.warmup_steps < 0 or \
                (self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer()):
            bad("warmup_steps", "must be an int >= 0, or a ratio in (0, 1)")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.lr_scheduler_type not in SCHEDULERS:
            bad("lr_scheduler_type", f"use one of {sorted(SCHEDULERS)}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm < 0):
            bad("max_grad_norm", "must be >= 0 (0 or None: no clipping)")
        for name in ("adam_beta1", "adam_beta2"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        if not _is_number(self.adam_epsilon) or self.adam_epsilon <= 0:
            bad("adam_epsilon", "must be positive")
        if self.optim not in OPTIMIZERS:
            bad("optim", f"use an AdamW variant: {sorted(OPTIMIZERS)}")
        for name in ("logging_steps", "save_steps"):
            self._check_interval(name, getattr(self, name))
        if self.eval_steps is not None:
            self._check_interval("eval_steps", self.eval_steps)
        if self.eval_strategy not in ("no", "steps"):
            bad("eval_strategy", "use 'no' or 'steps'")
        if self.save_strategy not in ("no", "steps"):
            bad("save_strategy", "use 'no' or 'steps'")
        if self.save_total_limit is not None and (not _is_int(self.save_total_limit) or self.save_total_limit < 1):
            bad("save_total_limit", "must be a positive int or None (keep all)")
        if not _is_int(self.seed):
            bad("seed", "must be an int")
        if self.data_seed is not None and not _is_int(self.data_seed):
            bad("data_seed", "must be an int or None (use seed)")
        for name in ("max_seq_length", "max_length"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 2):
                bad(name, "must be an int >= 2 or None (the model's max_seq_length)")
        if self.max_seq_length is not None and self.max_length is not None and self.max_seq_length != self.max_length:
            raise ValueError(f"max_seq_length={self.max_seq_length!r} and max_length={self.max_length!r} disagree; "
                             f"they are the same setting (Unsloth's and TRL's name): give one")
        for name in ("packing", "assistant_only_loss", "disable_tqdm", "fp16", "bf16", "remove_unused_columns"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.completion_only_loss is not None and not isinstance(self.completion_only_loss, bool):
            bad("completion_only_loss", "must be None, True or False")
        if self.packing_strategy not in ("bfd", "wrapped"):
            bad("packing_strategy", "use 'bfd' or 'wrapped'")
        pad = self.pad_to_multiple_of
        if pad is not None and (not _is_int(pad) or pad <= 0):
            bad("pad_to_multiple_of", "must be a positive int or None")
        if not isinstance(self.dataset_text_field, str):
            bad("dataset_text_field", "must be a column name ('' with a data_collator that takes raw records)")
        if self.dataset_kwargs is not None and not isinstance(self.dataset_kwargs, dict):
            bad("dataset_kwargs", "must be a dict such as {'skip_prepare_dataset': True} or None")
        from fastlora_jax.reporting import normalize_report_to
        normalize_report_to(self.report_to)  # unknown names fail here, with the accepted ones
        if self.mesh is not None:
            from jax.sharding import Mesh
            if isinstance(self.mesh, str):
                if not sharding.is_none_spec(self.mesh):
                    sharding.parse_mesh(self.mesh)  # a malformed spec fails here, naming it
            elif not isinstance(self.mesh, Mesh):
                bad("mesh", "use None (the model's mesh, or every device on data), a spec such as "
                            "'data=2,fsdp=2', 'auto', 'none' (one device) or a jax.sharding.Mesh")

    @staticmethod
    def _check_interval(name, v):
        if not _is_number(v) or v <= 0 or (v >= 1 and not float(v).is_integer()):
            raise ValueError(f"{name}={v!r} is not accepted: must be a positive int, or a ratio of the total "
                             f"steps in (0, 1)")

    # ---------------------------------------------------------------- derived
    @property
    def skip_prepare_dataset(self) -> bool:
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset", False))

    @property
    def train_batch_size(self) -> int:
        """Rows per optimizer step on one device (HF's per-device meaning); `SFTTrainer.rows_per_step` is the
        global count under a mesh."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def resolved_max_seq_length(self, model) -> int:
        return self.max_seq_length or self.max_length or int(getattr(model, "max_seq_length", 2048))

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * steps_per_epoch))

    def num_warmup_steps(self, total: int) -> int:
        if 0 < self.warmup_steps < 1:
            return math.ceil(self.warmup_steps * total)
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(self.warmup_ratio * total)

    @staticmethod
    def interval(value, total: int) -> int:
        return max(1, math.ceil(value * total)) if value < 1 else int(value)

    def to_dict(self) -> dict:
        return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                for k, v in dataclasses.asdict(self).items()}


SFTConfig = TrainingArguments


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict


@dataclass
class TrainerState:
    """HF's `trainer.state`: where training stands."""
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list = field(default_factory=list)


class TrainerCallback:
    """Hooks `SFTTrainer` calls; override any. `trainer.state` says where training stands. Raising from a hook
    stops training (checkpoints already written stay valid)."""

    def on_train_begin(self, trainer): ...

    def on_step_end(self, trainer, step: int, metrics: dict): ...

    def on_log(self, trainer, logs: dict): ...

    def on_evaluate(self, trainer, metrics: dict): ...

    def on_save(self, trainer, step: int, checkpoint_dir: Path): ...

    def on_train_end(self, trainer, output: TrainOutput): ...


LEGACY_KWARGS = {"dataset_text_field", "max_seq_length", "packing", "max_length"}
IGNORED_KWARGS = {"dataset_num_proc", "compute_metrics", "peft_config"}


class SFTTrainer:
    """Supervised fine-tuning of a `FastLanguageModel` LoRA model: TRL's `SFTTrainer(model, args,
    train_dataset, eval_dataset, processing_class, formatting_func, callbacks)`.

    Datasets are lists of dicts, `.jsonl` paths or `datasets.Dataset`s in TRL's formats (data.py). They are
    tokenized here, at construction, so a bad record fails now rather than mid-run. `tokenizer=` is accepted
    for `processing_class=`, and Unsloth's older keywords (`dataset_text_field=`, `max_seq_length=`,
    `packing=`) passed here override `args`.

    With a `data_collator` (e.g. `UnslothVisionDataCollator(model, processor)` for a `FastVisionModel`), the
    records are kept as given and each micro-batch is `data_collator(records)`, a dict with `input_ids`,
    `attention_mask`, `labels` (and the images' `pixel_values`, `image_grid_thw`, `mm_token_type_ids`); which
    tokens are trained on is then the collator's choice. The first step's batch is collated at construction, so
    a collator that cannot handle the records fails now.
    """

    def __init__(self, model, args: TrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, tokenizer=None, formatting_func: Callable[[dict], str] | None = None,
                 callbacks: list | None = None, data_collator: Callable[[list], dict] | None = None, **kwargs):
        from fastlora_jax.model import CausalLM

        if not isinstance(model, CausalLM):
            raise TypeError(f"model must be a FastLanguageModel model (CausalLM); got {type(model).__name__}")
        if model.lora_layout is None or model.lora_params is None:
            raise ValueError("model has no LoRA adapters: call FastLanguageModel.get_peft_model(model, ...) "
                             "before SFTTrainer (full fine-tuning is not supported)")
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model.base_params)):
            raise ValueError("model is abstract (FastLanguageModel.from_config): load weights with from_pretrained")
        if args is None:
            args = TrainingArguments()
        if not isinstance(args, TrainingArguments):
            hint = "; the tokenizer goes in processing_class= (or tokenizer=)" \
                if hasattr(args, "apply_chat_template") else ""
            raise TypeError(f"args must be fastlora_jax.trainer.SFTConfig / TrainingArguments; "
                            f"got {type(args).__name__}{hint}")
        unknown = set(kwargs) - LEGACY_KWARGS - IGNORED_KWARGS
        if unknown:
            raise TypeError(f"SFTTrainer() got unexpected keyword arguments {sorted(unknown)}")
        for name in sorted(IGNORED_KWARGS & set(kwargs)):
            if kwargs[name] is not None:
                warnings.warn(f"SFTTrainer: {name}= is not used here and is ignored (LoRA comes from "
                              f"FastLanguageModel.get_peft_model)", stacklevel=2)
        overrides = {k: v for k, v in kwargs.items() if k in LEGACY_KWARGS and v is not None}
        if overrides:
            args = dataclasses.replace(args, **overrides)
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise ValueError("give the tokenizer once: processing_class= or tokenizer=, not two different ones")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if args.eval_strategy == "steps" and eval_dataset is None:
            raise ValueError("eval_strategy='steps' needs an eval_dataset")
        for i, cb in enumerate(callbacks or []):
            if isinstance(cb, type):
                raise TypeError(f"callbacks[{i}] is the class {cb.__name__}; pass an instance")
        if data_collator is not None:
            if not callable(data_collator):
                raise TypeError(f"data_collator must be callable (records -> batch dict); got {data_collator!r}")
            if args.packing:
                raise ValueError("packing=True does not apply with a data_collator (it batches whole records); "
                                 "set packing=False")
            if formatting_func is not None:
                raise ValueError("formatting_func and data_collator: give the formatting function to the collator "
                                 "(UnslothVisionDataCollator(model, processor, formatting_func=...))")
        self.model = model
        self.args = args
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.formatting_func = formatting_func
        self.data_collator = data_collator
        self.mesh = self._resolve_mesh(model, args)
        from fastlora_jax import reporting
        # report_to writers and loss.png: process 0's (one event file per run, not one per host)
        reporters = reporting.callbacks_for(args) if sharding.is_writer() else []
        self.callbacks = reporters + list(callbacks or [])
        self.max_seq_length = args.resolved_max_seq_length(model)
        self.data_options = None if data_collator is not None else DataOptions(
            dataset_text_field=args.dataset_text_field or "text", formatting_func=formatting_func,
            assistant_only_loss=args.assistant_only_loss, completion_only_loss=args.completion_only_loss)
        self._raw_train, self._raw_eval = train_dataset, eval_dataset
        self._prepare_data()
        self.state = TrainerState()

    @staticmethod
    def _resolve_mesh(model, args):
        """The mesh training runs on (see TrainingArguments.mesh); the model is placed on it if it is not yet."""
        requested = sharding.resolve_mesh(args.mesh)
        if sharding.is_none_spec(args.mesh):
            if model.mesh is not None:
                raise ValueError(f"SFTConfig(mesh='none') asks for one device, but the model was loaded on the mesh "
                                 f"{sharding.describe(model.mesh)}; load it without mesh= to train on one device")
            return None
        if model.mesh is not None:
            if requested is not None and not sharding.same_mesh(requested, model.mesh):
                raise ValueError(f"SFTConfig(mesh={args.mesh!r}) is {sharding.describe(requested)}, but the model was "
                                 f"loaded on the mesh {sharding.describe(model.mesh)}; give from_pretrained(mesh=...) "
                                 f"and SFTConfig the same mesh, or leave SFTConfig.mesh unset (the model's is used)")
            return model.mesh
        if requested is None and jax.device_count() > 1:
            requested = sharding.make_mesh()  # every device on the data axis
        if requested is not None:
            model.shard(requested)
        return requested

    @property
    def world(self) -> int:
        """Devices a step's batch is split over (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.size

    @property
    def micro_batch(self) -> int:
        """Rows of one micro-batch: per_device_train_batch_size on each device."""
        return self.args.per_device_train_batch_size * self.world

    # ---------------------------------------------------------------- data
    def _prepare_data(self) -> None:
        self.train_data = self._prepare(self._raw_train, "train_dataset", packing=self.args.packing)
        self.eval_data = None if self._raw_eval is None else self._prepare(self._raw_eval, "eval_dataset",
                                                                            packing=False)

    def _prepare(self, data, name: str, packing: bool) -> SFTData | CollatedData:
        if isinstance(data, (SFTData, CollatedData)):
            return data
        if self.data_collator is not None:
            collated = CollatedData(data, self.data_collator, name)
            first = collated.collate(collated.step_rows(0, self.micro_batch, 1, self.data_seed),
                                     where=f"{name}: the first batch")
            training.prepare_micro_batch(self.model, first)  # the batch fits the model (image tokens, shapes)
            return collated
        records = load_records(data, name=name)
        if _has_images(records):
            raise ValueError(f"{name} holds images; pass data_collator=UnslothVisionDataCollator(model, processor) "
                             f"(fastlora_jax.vision_data) with a FastVisionModel model")
        if not self.args.dataset_text_field and not all("input_ids" in r for r in records):
            raise ValueError(f"dataset_text_field='' needs a data_collator (or pre-tokenized records with input_ids); "
                             f"{name} has keys {sorted(records[0])}")
        if self.args.skip_prepare_dataset and not all("input_ids" in r for r in records):
            raise ValueError("dataset_kwargs={'skip_prepare_dataset': True} without a data_collator needs "
                             "pre-tokenized records (input_ids); pass data_collator= for raw records")
        if self.processing_class is None and not all("input_ids" in r for r in records):
            raise ValueError(f"{name} is not tokenized: pass processing_class=tokenizer")
        examples = tokenize_records(records, self.processing_class, self.data_options, name=name)
        pad_id = pad_token_id_of(self.processing_class) if self.processing_class is not None else 0
        data = build_rows(examples, self.max_seq_length, pad_id, packing=packing,
                          packing_strategy=self.args.packing_strategy, pad_to_multiple_of=self.args.pad_to_multiple_of)
        if data.num_label_tokens == 0:
            raise ValueError(f"{name} has no tokens to train on: every label is masked "
                             f"(check assistant_only_loss / response_part and max_seq_length)")
        if data.num_truncated:
            warnings.warn(f"{name}: {data.num_truncated} of {data.num_examples} examples are longer than "
                          f"max_seq_length={self.max_seq_length} and were truncated", stacklevel=3)
        return data

    def set_response_only(self, instruction_part: str | None = None, response_part: str | None = None) -> None:
        """Train only on the responses (see `train_on_responses_only`)."""
        if self.data_collator is not None:
            raise ValueError("with a data_collator, the collator chooses the trained tokens: build it with "
                             "train_on_responses_only=True (and instruction_part=/response_part=), as "
                             "UnslothVisionDataCollator(model, processor, ...) takes them")
        if instruction_part is None and response_part is None:
            self.data_options = dataclasses.replace(self.data_options, assistant_only_loss=True)
        else:
            self.data_options = dataclasses.replace(self.data_options, instruction_part=instruction_part,
                                                    response_part=response_part)
        self._prepare_data()

    # ---------------------------------------------------------------- plan
    @property
    def rows_per_step(self) -> int:
        return self.args.train_batch_size * self.world

    @property
    def data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    @property
    def steps_per_epoch(self) -> int:
        return self.train_data.steps_per_epoch(self.rows_per_step)

    @property
    def max_steps(self) -> int:
        return self.args.total_steps(self.steps_per_epoch)

    def _optimizer_kwargs(self, total: int) -> dict:
        a = self.args
        return dict(learning_rate=float(a.learning_rate), weight_decay=float(a.weight_decay),
                    warmup_steps=a.num_warmup_steps(total), total_steps=total,
                    lr_scheduler_type=SCHEDULERS[a.lr_scheduler_type], max_grad_norm=a.max_grad_norm or 0.0,
                    adam_beta1=float(a.adam_beta1), adam_beta2=float(a.adam_beta2), adam_epsilon=float(a.adam_epsilon))

    def create_optimizer(self, total: int):
        return training.make_optimizer(**self._optimizer_kwargs(total))

    def learning_rate_at(self, step: int, total: int) -> float:
        """The learning rate the optimizer uses for the 1-based step `step` (as make_optimizer schedules it)."""
        k = self._optimizer_kwargs(total)
        lr, warm, kind = k["learning_rate"], k["warmup_steps"], k["lr_scheduler_type"]
        n = step - 1  # updates before this one
        if warm and n < warm:
            return lr * n / warm
        n -= warm
        decay = max(total - warm, 1)
        if kind == "linear":
            return lr * max(0.0, 1 - n / decay)
        if kind == "cosine":
            return lr * 0.5 * (1 + math.cos(math.pi * min(n, decay) / decay))
        return lr

    def _train_step(self, optimizer, total: int):
        """The jitted train step for this model and optimizer; kept on the model (it closes over it), so a new
        trainer for the same model and settings reuses the compiled step instead of compiling again."""
        key = (tuple(sorted(self._optimizer_kwargs(total).items())),
               repr(getattr(self.model, "use_gradient_checkpointing", False)), id(self.model.mesh))
        cache = self.model.__dict__.setdefault("_sft_train_steps", {})
        if key not in cache:
            cache[key] = training.make_train_step(self.model, optimizer)
        return cache[key]

    def step_dropout_key(self, step: int):
        """The LoRA-dropout key of the 1-based step `step`; None when the adapter has no dropout."""
        if float(self.model.lora_layout.spec.lora_dropout) <= 0:
            return None
        return jax.random.fold_in(jax.random.key(self.args.seed), step)

    # ---------------------------------------------------------------- evaluation
    def _eval_loss_fn(self):
        """`f(lora_params, batch) -> (loss sum, counted tokens)` of one batch (`training.prepare_micro_batch`'s)."""
        key = ("eval", repr(getattr(self.model, "use_gradient_checkpointing", False)), id(self.model.mesh))
        cache = self.model.__dict__.setdefault("_sft_train_steps", {})
        if key not in cache:
            loss_sum = self.model.loss_sum_fn()

            def one(base, lp, mb):
                extra = {k: mb[k] for k in ("position_ids", "vision") if mb.get(k) is not None}
                return loss_sum(base, lp, mb["input_ids"], mb["labels"], mb.get("attention_mask"), None, **extra)

            jitted = jax.jit(one)
            model = self.model

            def run(lp, batch):
                with sharding.use_mesh(model.mesh):
                    mb = sharding.put_batch(training.prepare_micro_batch(model, batch), model.mesh)
                    return jitted(model.base_params, lp, mb)

            cache[key] = run
        return cache[key]

    def evaluate(self, eval_dataset=None, lora_params=None) -> dict:
        """`eval_loss`: the token-weighted mean loss over the eval set (no dropout), as `compute_loss` gives
        it for the whole set at once."""
        data = self.eval_data if eval_dataset is None else self._prepare(eval_dataset, "eval_dataset", False)
        if data is None:
            raise ValueError("no eval_dataset: pass one to SFTTrainer or to evaluate()")
        params = self.model.lora_params if lora_params is None else lora_params
        fn = self._eval_loss_fn()
        start = time.perf_counter()
        total, count = 0.0, 0
        for batch in data.eval_batches(self.args.per_device_eval_batch_size * self.world):
            s, c = fn(params, batch)
            total += float(s)
            count += int(c)
        metrics = {"eval_loss": total / max(count, 1), "eval_tokens": count,
                   "eval_runtime": round(time.perf_counter() - start, 4)}
        for cb in self.callbacks:
            _call(cb, "on_evaluate", self, metrics)
        return metrics

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.args.output_dir).absolute() / CHECKPOINT_DIR

    def _manager(self, directory: Path, save_steps: int | None):
        import orbax.checkpoint as ocp
        every = save_steps or 1
        # Synchronous saves: a checkpoint is complete (renamed from its temporary directory) when the step that
        # saved it returns. An async save is finalized only when the next one starts, so a kill in between
        # lost every step since the previous save. A LoRA checkpoint is small; the wait is short.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=self.args.save_total_limit, create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
            enable_async_checkpointing=False,
            should_save_fn=lambda step, last_saved: step % every == 0)
        return ocp.CheckpointManager(directory, options=options)

    def _resolve_resume(self, resume_from_checkpoint) -> tuple[Path, int] | None:
        """(checkpoint manager directory, step) to resume from, or None to start fresh."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if not isinstance(resume_from_checkpoint, (bool, str, os.PathLike)):
            raise TypeError(f"resume_from_checkpoint={resume_from_checkpoint!r} is not accepted: use True (the last "
                            f"checkpoint in output_dir), a checkpoint path, or None/False")
        if resume_from_checkpoint is True:
            root = self.checkpoint_dir
            step = _latest_step(root)
            if step is None:
                raise ValueError(f"resume_from_checkpoint=True but there is no complete checkpoint in {root}")
            return root, step
        path = Path(resume_from_checkpoint).absolute()
        if not path.exists():
            raise FileNotFoundError(f"resume_from_checkpoint={str(resume_from_checkpoint)!r} does not exist")
        if path.name.isdigit() and (path / "state").is_dir():
            return path.parent, int(path.name)
        for root in (path, path / CHECKPOINT_DIR):
            step = _latest_step(root)
            if step is not None:
                return root, step
        raise ValueError(f"resume_from_checkpoint={str(resume_from_checkpoint)!r} holds no complete checkpoint "
                         f"(expected output_dir, output_dir/{CHECKPOINT_DIR} or output_dir/{CHECKPOINT_DIR}/<step>)")

    def _restore(self, root: Path, step: int, template: dict) -> tuple[dict, dict]:
        """The checkpoint's state and metadata. The metadata is read and checked first: a checkpoint of another
        LoRA config or base model is refused by name before its tensors are read."""
        import orbax.checkpoint as ocp
        where = root / str(step)
        manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
        try:
            try:
                meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            except Exception as err:
                raise ValueError(f"cannot read the metadata of checkpoint {where} "
                                 f"({type(err).__name__}: {str(err)[:300]})") from err
            if meta.get("version") not in READABLE_VERSIONS:
                raise ValueError(f"checkpoint {where} has version {meta.get('version')!r}; "
                                 f"this trainer reads versions {list(READABLE_VERSIONS)}")
            self._check_resume_identity(meta, where)
            try:
                state = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template)))["state"]
            except Exception as err:
                raise ValueError(f"checkpoint {where} does not fit this model and LoRA config "
                                 f"({type(err).__name__}: {str(err)[:300]})") from err
        finally:
            manager.close()
        _check_same_shapes(state, template, where)
        return state, meta

    def _key_data(self, step: int) -> list[int] | None:
        key = self.step_dropout_key(step)
        return None if key is None else np.asarray(jax.random.key_data(key)).ravel().tolist()

    def lora_config_record(self) -> dict:
        """The adapter's config as a checkpoint records it: PEFT's adapter_config without the fields that do
        not change what is trained (where the base lives, the PEFT version, inference mode)."""
        config = self.model.adapter_config()
        return {k: v for k, v in sorted(config.items()) if k not in LORA_RECORD_SKIP}

    def model_identity(self) -> dict:
        """What the adapter is trained on: the base's architecture config (a digest), its path, dtype and format."""
        config = self.model.config.to_dict()
        arch = {k: v for k, v in config.items() if k not in MODEL_CONFIG_SKIP}
        digest = hashlib.sha256(json.dumps(_jsonable(arch), sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"name_or_path": str(self.model.name_or_path), "architectures": config.get("architectures"),
                "config_sha256": digest, "dtype": self.model.dtype.name, "is_4bit": bool(self.model.is_4bit)}

    def optimizer_record(self) -> dict:
        return {"optim": self.args.optim, **self._optimizer_kwargs(self.max_steps)}

    def _check_resume_identity(self, meta: dict, where: Path) -> None:
        """Refuse a checkpoint of another adapter or another base model: restored into a different LoRA
        config its tensors would be cut or padded to fit, and the adapter written at the end would not load."""
        recorded = meta.get("lora_config")
        if recorded is not None:
            now = _jsonable(self.lora_config_record())
            diff = _diff(recorded, now)
            if diff:
                raise ValueError(f"checkpoint {where} was trained with a different LoRA config: "
                                 f"{_describe(diff)} (checkpoint vs this model); resume with the checkpoint's "
                                 f"get_peft_model arguments, or train into a new output_dir")
        model = meta.get("model")
        if model is not None:
            now = self.model_identity()
            diff = _diff({k: model.get(k) for k in ("architectures", "config_sha256")},
                         {k: now[k] for k in ("architectures", "config_sha256")})
            if diff:
                raise ValueError(f"checkpoint {where} was trained on another base model ({model.get('name_or_path')!r}, "
                                 f"{_describe(diff)}) than this one ({now['name_or_path']!r}); load that model "
                                 f"to resume, or train into a new output_dir")

    def _check_resume_meta(self, meta: dict, where: Path) -> None:
        """Warn about settings that differ from the checkpoint's: training continues, but not as the
        uninterrupted run would have."""
        expected = {"data_fingerprint": self.train_data.fingerprint, "rows_per_step": self.rows_per_step,
                    **({"mesh": sharding.describe(self.mesh)} if "mesh" in meta else {}),
                    "micro_batch": self.micro_batch, "data_seed": self.data_seed,
                    "seed": self.args.seed, "max_steps": self.max_steps}
        step = int(meta["global_step"])
        if meta.get("next_dropout_key") != self._key_data(step + 1):
            expected["next_dropout_key"] = self._key_data(step + 1)
        diff = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if meta.get("optimizer") is not None:
            diff.update({f"optimizer.{k}": v for k, v in _diff(meta["optimizer"],
                                                                _jsonable(self.optimizer_record())).items()})
        if meta.get("model") is not None:
            now = self.model_identity()
            diff.update({f"model.{k}": (meta["model"].get(k), now[k]) for k in ("name_or_path", "dtype", "is_4bit")
                         if meta["model"].get(k) != now[k]})
        if meta.get("lora_config") is None:
            warnings.warn(f"checkpoint {where} (version {meta.get('version')}) does not record its LoRA config; "
                          f"only the tensor shapes were checked", stacklevel=3)
        if diff:
            warnings.warn(f"resuming from {where} with different settings: {_describe(diff)} (checkpoint vs now); "
                          f"training continues, but will not match an uninterrupted run exactly", stacklevel=3)

    # ---------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Train to `max_steps` (or `num_train_epochs`); resume from the last checkpoint with
        `resume_from_checkpoint=True`, or from a given one with a path. Returns `TrainOutput(global_step,
        training_loss, metrics)`, sets `model.lora_params` and writes the adapter to `output_dir`."""
        from tqdm.auto import tqdm

        args, data = self.args, self.train_data
        total = self.max_steps
        micro, accum = self.micro_batch, args.gradient_accumulation_steps
        log_every = args.interval(args.logging_steps, total)
        eval_every = args.interval(args.eval_steps if args.eval_steps is not None else args.logging_steps, total)
        save_every = args.interval(args.save_steps, total) if args.save_strategy == "steps" else None
        optimizer = self.create_optimizer(total)
        step_fn = self._train_step(optimizer, total)

        # The step donates its inputs: train on a copy, so model.lora_params stays valid until the end.
        params = jax.tree.map(jnp.array, self.model.lora_params)
        opt_state = optimizer.init(params)
        if self.mesh is not None:  # replicated on the mesh, as the step keeps them
            params, opt_state = sharding.place((params, opt_state), sharding.replicated(self.mesh))
        start, loss_sum, history = 0, 0.0, []
        self.resumed_from = None
        resume = self._resolve_resume(resume_from_checkpoint)
        if resume is not None:
            root, step = resume
            template = {"lora_params": params, "opt_state": opt_state}
            # On a mesh: restored straight into the arrays' shardings (orbax reads each process's shards).
            template = _abstract(template) if self.mesh is not None else _host_copy(template)
            state, meta = self._restore(root, step, template)
            self._check_resume_meta(meta, root / str(step))
            if self.mesh is None:
                params = jax.tree.map(jnp.asarray, state["lora_params"])
                opt_state = jax.tree.map(jnp.asarray, state["opt_state"])
            else:
                params, opt_state = state["lora_params"], state["opt_state"]
            start, loss_sum, history = int(meta["global_step"]), float(meta["loss_sum"]), list(meta["log_history"])
            self.resumed_from = (root / str(step), start)
            if start > total:
                raise ValueError(f"resume_from_checkpoint: the checkpoint {root / str(step)} is at step {start}, "
                                 f"past max_steps={total} of this run")
        self.state = TrainerState(global_step=start, max_steps=total, epoch=start / self.steps_per_epoch,
                                  log_history=history)

        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        manager = self._manager(self.checkpoint_dir, save_every) if save_every else None
        if manager is not None:
            stale = [s for s in manager.all_steps() if s > start]
            if stale:  # a previous run's checkpoints past our start: this run replaces them
                warnings.warn(f"removing checkpoints {stale} of a previous run from {self.checkpoint_dir} "
                              f"(pass resume_from_checkpoint=True to continue that run instead)", stacklevel=2)
                for s in stale:
                    manager.delete(s)
        bar = tqdm(total=total, initial=start, desc="train", unit="step",
                   disable=args.disable_tqdm or not sharding.is_writer(), dynamic_ncols=True)
        for cb in self.callbacks:
            _call(cb, "on_train_begin", self)
        t_start = time.perf_counter()
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
        run_tokens = 0
        try:
            for step in range(start + 1, total + 1):
                batch = data.step_batch(step - 1, micro, accum, self.data_seed)
                n_tokens = _count_tokens(batch)
                params, opt_state, metrics = step_fn(params, opt_state, batch, self.step_dropout_key(step))
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # before any save of these params
                    last = manager.latest_step() if manager is not None else None
                    kept = f"; the checkpoints up to step {last} in {self.checkpoint_dir} are kept" if last else ""
                    raise FloatingPointError(f"training stopped at step {step}: the loss is {loss} and the gradient "
                                             f"norm {grad_norm}; lower learning_rate (now {args.learning_rate}) or "
                                             f"check the data{kept}")
                loss_sum += loss
                run_tokens += n_tokens
                window["loss"] += loss
                window["steps"] += 1
                window["tokens"] += n_tokens
                self.state.global_step = step
                self.state.epoch = step / self.steps_per_epoch
                elapsed = time.perf_counter() - window["t0"]
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window['tokens'] / max(elapsed, 1e-9):,.0f}",
                                refresh=False)
                bar.update(1)
                for cb in self.callbacks:
                    _call(cb, "on_step_end", self, step, {k: float(v) for k, v in metrics.items()})
                if step % log_every == 0 or step == total:
                    logs = {"step": step, "epoch": round(self.state.epoch, 4),
                            "loss": window["loss"] / window["steps"], "grad_norm": float(metrics["grad_norm"]),
                            "learning_rate": self.learning_rate_at(step, total),
                            "tokens_per_second": round(window["tokens"] / max(elapsed, 1e-9), 1)}
                    self._log(logs, bar)
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
                if args.eval_strategy == "steps" and self.eval_data is not None and step % eval_every == 0:
                    metrics_eval = self.evaluate(lora_params=params)
                    self._log({"step": step, "epoch": round(self.state.epoch, 4), **metrics_eval}, bar)
                if manager is not None and (manager.should_save(step) or step == total):
                    self._save(manager, step, params, opt_state, loss_sum, force=step == total)
        finally:
            bar.close()
            if manager is not None:
                manager.wait_until_finished()  # a save in flight completes (or is left as a temporary dir)
                manager.close()

        runtime = time.perf_counter() - t_start
        self.model.lora_params = params
        self.save_model(output_dir)
        steps_run = total - start
        metrics = {"train_runtime": round(runtime, 4),
                   "train_steps_per_second": round(steps_run / max(runtime, 1e-9), 3),
                   "train_samples_per_second": round(steps_run * self.rows_per_step / max(runtime, 1e-9), 3),
                   "train_tokens_per_second": round(run_tokens / max(runtime, 1e-9), 1),
                   "train_loss": loss_sum / max(total, 1), "epoch": round(total / self.steps_per_epoch, 4)}
        if self.eval_data is not None:
            metrics.update(self.evaluate())
        self.state.log_history.append({"step": total, **metrics})
        if sharding.is_writer():
            _atomic_json(output_dir / TRAINER_STATE, {"global_step": total, "max_steps": total,
                                                       "log_history": self.state.log_history,
                                                       "args": args.to_dict()})
        output = TrainOutput(total, metrics["train_loss"], metrics)
        for cb in self.callbacks:
            _call(cb, "on_train_end", self, output)
        return output

    @property
    def history(self) -> list[dict]:
        """The logged dicts (training loss, eval loss, ...), as `trainer.state.log_history`."""
        return self.state.log_history

    def _log(self, logs: dict, bar) -> None:
        self.state.log_history.append(logs)
        if not self.args.disable_tqdm and sharding.is_writer():
            bar.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()}))
        for cb in self.callbacks:
            _call(cb, "on_log", self, logs)

    def _save(self, manager, step: int, params, opt_state, loss_sum: float, force: bool = False) -> None:
        import orbax.checkpoint as ocp
        epoch, in_epoch = self.train_data.position(step, self.rows_per_step)  # where the next step reads
        meta = {"version": CHECKPOINT_VERSION, "global_step": step, "max_steps": self.max_steps,
                "epoch": epoch, "step_in_epoch": in_epoch, "rows_per_step": self.rows_per_step,
                "micro_batch": self.micro_batch, "num_rows": self.train_data.num_rows,
                "data_fingerprint": self.train_data.fingerprint, "data_seed": self.data_seed,
                "seed": self.args.seed, "rng": "dropout key of step s = fold_in(key(seed), s)",
                "next_dropout_key": self._key_data(step + 1),
                "loss_sum": loss_sum, "log_history": self.state.log_history,
                "lora_config": self.lora_config_record(), "model": self.model_identity(),
                "optimizer": self.optimizer_record(), "mesh": sharding.describe(self.mesh)}
        # On a mesh the arrays go to orbax as they are (each process writes its shards; a replicated array once).
        state = {"lora_params": params, "opt_state": opt_state}
        state = _host_copy(state) if self.mesh is None else state
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(_jsonable(meta))), force=force)
        for cb in self.callbacks:
            _call(cb, "on_save", self, step, self.checkpoint_dir / str(step))

    def save_model(self, output_dir=None) -> Path:
        """The adapter (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer."""
        output_dir = Path(output_dir or self.args.output_dir)
        self.model.save_pretrained(output_dir)  # written by process 0 (from every process's LoRA, replicated)
        if sharding.is_writer() and self.processing_class is not None and hasattr(self.processing_class,
                                                                                "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        return output_dir


def train_on_responses_only(trainer: SFTTrainer, instruction_part: str | None = None,
                            response_part: str | None = None) -> SFTTrainer:
    """Unsloth's `train_on_responses_only`: the loss counts only the responses.

    With `instruction_part`/`response_part` (e.g. "<|start_header_id|>user<|end_header_id|>\\n\\n" and
    "<|start_header_id|>assistant<|end_header_id|>\\n\\n"): after each response_part up to the next
    instruction_part of the rendered text. With neither (chat data): the assistant turns as the chat
    template renders them (SFTConfig(assistant_only_loss=True)). Returns the trainer.
    """
    if not isinstance(trainer, SFTTrainer):
        raise TypeError(f"trainer must be an SFTTrainer; got {type(trainer).__name__}")
    trainer.set_response_only(instruction_part, response_part)
    return trainer


# ------------------------------------------------------------------------------------------ collated data


class CollatedData:
    """Records kept as given and batched by a `data_collator` at each step (TRL's `skip_prepare_dataset`).

    The interface the trainer uses of `SFTData` (steps per epoch, the rows of a step, the data position,
    a fingerprint, eval batches), with the same row order: step `s` (0-based) takes the `s % steps_per_epoch`-th
    slice of `micro_batch * accum` rows of the permutation `default_rng([seed, epoch])`. So the batches are a
    pure function of `(seed, s)` and resuming is exact. Unlike SFTData, an incomplete last slice of an epoch is
    not filled with filler rows: the step has fewer rows (the loss is token-weighted, so fillers would change
    nothing) and its last micro-batch is smaller.
    """

    def __init__(self, dataset, collator, name: str = "dataset"):
        if isinstance(dataset, (list, tuple)):
            records = list(dataset)
        elif hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") \
                and type(dataset).__name__ == "Dataset":
            records = dataset  # a datasets.Dataset: rows are read (and images decoded) when a step needs them
        else:
            records = load_records(dataset, name=name)
        if len(records) == 0:
            raise ValueError(f"{name} is empty")
        self.records = records
        self.collator = collator
        self.name = name

    @property
    def num_rows(self) -> int:
        return len(self.records)

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.num_rows}".encode())
        stored = getattr(self.records, "_fingerprint", None)  # datasets.Dataset keeps one
        if stored:
            h.update(str(stored).encode())
        else:
            for record in self.records:
                h.update(json.dumps(record, sort_keys=True, default=_digest).encode())
        return h.hexdigest()[:16]

    def steps_per_epoch(self, rows_per_step: int) -> int:
        return -(-self.num_rows // rows_per_step)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([int(seed), int(epoch)]).permutation(self.num_rows)

    def position(self, step: int, rows_per_step: int) -> tuple[int, int]:
        spe = self.steps_per_epoch(rows_per_step)
        return step // spe, step % spe

    def step_rows(self, step: int, micro_batch: int, accum: int, seed: int) -> np.ndarray:
        per_step = micro_batch * accum
        epoch, k = self.position(step, per_step)
        return self.epoch_order(seed, epoch)[k * per_step: (k + 1) * per_step]

    def collate(self, rows, where: str) -> dict:
        records = [self.records[int(i)] for i in rows]
        try:
            batch = self.collator(records)
        except Exception as err:
            err.add_note(f"in data_collator for {where} (rows {[int(i) for i in rows]} of {self.name})")
            raise
        if not hasattr(batch, "keys") or "input_ids" not in batch or "labels" not in batch:
            raise ValueError(f"{where}: data_collator returned {type(batch).__name__} with keys "
                             f"{sorted(batch) if hasattr(batch, 'keys') else None}; it must return a dict with "
                             f"input_ids, attention_mask and labels")
        return dict(batch)

    def step_batch(self, step: int, micro_batch: int, accum: int, seed: int) -> list[dict]:
        """The 0-based step `step` as a list of collated micro-batches (at most `accum`)."""
        rows = self.step_rows(step, micro_batch, accum, seed)
        return [self.collate(rows[i:i + micro_batch], where=f"step {step + 1}")
                for i in range(0, len(rows), micro_batch)]

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for lo in range(0, self.num_rows, batch_size):
            yield self.collate(np.arange(lo, min(lo + batch_size, self.num_rows)), where="evaluation")


def _digest(obj):
    """A JSON stand-in for what json cannot write (images, arrays, bytes): a hash of the content."""
    if hasattr(obj, "tobytes") and hasattr(obj, "size") and hasattr(obj, "mode"):  # PIL.Image
        return f"image:{obj.mode}:{obj.size}:{hashlib.sha256(obj.tobytes()).hexdigest()}"
    if isinstance(obj, np.ndarray):
        return f"array:{obj.dtype}:{obj.shape}:{hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}"
    if isinstance(obj, (bytes, bytearray)):
        return f"bytes:{hashlib.sha256(obj).hexdigest()}"
    if isinstance(obj, Path):
        return str(obj)
    return f"{type(obj).__name__}"


def _has_images(records, limit: int = 100) -> bool:
    """Whether chat records hold image parts (or an images column): they need a vision collator."""
    for record in records[:limit]:
        if record.get("images") is not None or record.get("image") is not None:
            return True
        for key in ("messages", "conversations"):
            turns = record.get(key)
            if not isinstance(turns, list):
                continue
            for turn in turns:
                content = turn.get("content") if isinstance(turn, dict) else None
                if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image"
                                                     for p in content):
                    return True
    return False


def _count_tokens(batch) -> int:
    """Attended tokens of a step's batch (a stacked dict or a list of micro-batches)."""
    parts = batch if isinstance(batch, list) else [batch]
    total = 0
    for mb in parts:
        mask = mb.get("attention_mask")
        total += int(np.asarray(mask).sum()) if mask is not None else int(np.size(mb["input_ids"]))
    return total


# ------------------------------------------------------------------------------------------ helpers


def _call(cb, name: str, *args):
    fn = getattr(cb, name, None)
    if fn is not None:
        fn(*args)


def _host_copy(tree):
    """A numpy copy (never a view of a device buffer: the train step donates its inputs)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _abstract(tree):
    """`jax.ShapeDtypeStruct`s with the arrays' shardings: the restore template of a mesh run."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _latest_step(root: Path) -> int | None:
    """The newest complete checkpoint step under `root` (temporary, unfinished saves are ignored)."""
    if not root.is_dir():
        return None
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
    try:
        return manager.latest_step()
    finally:
        manager.close()


LORA_RECORD_SKIP = {"base_model_name_or_path", "revision", "inference_mode", "peft_version"}
MODEL_CONFIG_SKIP = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                     "use_cache", "output_hidden_states", "output_attentions", "return_dict"}


def _diff(recorded: dict, now: dict) -> dict:
    """{key: (recorded, now)} for every key whose values differ."""
    return {k: (recorded.get(k), now.get(k)) for k in sorted(set(recorded) | set(now))
            if recorded.get(k) != now.get(k)}


def _describe(diff: dict) -> str:
    return ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())


def _check_same_shapes(restored, template, where: Path) -> None:
    """orbax restores the shapes on disk whatever the template says: a checkpoint of another rank would be
    taken as it is. Refuse any tensor whose shape differs from this model's."""
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(restored)}
    want = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(template)}
    bad = [f"{k}: {got.get(k)} vs {want.get(k)}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    if bad:
        raise ValueError(f"checkpoint {where} does not fit this model's LoRA config ({len(bad)} tensors differ, "
                         f"checkpoint vs this model: {'; '.join(bad[:4])})")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def _atomic_json(path: Path, obj) -> None:
    from fastlora_jax.convert.peft import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


__all__ = ["CollatedData", "SFTConfig", "SFTTrainer", "TrainOutput", "TrainerCallback", "TrainerState", "TrainingArguments",
           "train_on_responses_only", "IGNORE_INDEX"]
