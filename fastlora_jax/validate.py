"""Argument and file checks shared by the public entry points.

Every check raises at the boundary with the argument's name, the value given and what is accepted, so a
wrong input never turns into a silently different run or a traceback from deep inside JAX.
"""

from __future__ import annotations

import math

import numpy as np


def check_bool(name: str, value) -> bool:
    """Only real booleans: "False", "yes" and 2 are truthy, and treating them as True would be silently wrong."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r} is not accepted: use True or False")
    return bool(value)


def check_optional_bool(name: str, value) -> bool | None:
    return None if value is None else check_bool(name, value)


LOAD_FLAGS = ("load_in_8bit", "full_finetuning", "trust_remote_code", "local_files_only", "fast_inference")


def check_load_flags(load_in_4bit, double_quant, kwargs: dict) -> None:
    """from_pretrained's boolean switches, before anything is read."""
    check_bool("load_in_4bit", load_in_4bit)
    check_bool("double_quant", double_quant)
    for name in LOAD_FLAGS:
        if name in kwargs:
            check_bool(name, kwargs[name])


def is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_number(name: str, value, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number in [low, high] (open ends when asked); NaN fails every comparison, so test it first."""
    bounds = ("(" if low_open else "[") + (str(low) if low is not None else "-inf") + ", " + \
             (str(high) if high is not None else "inf") + (")" if high_open or high is None else "]")
    if not is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} is not accepted: use a finite number in {bounds}")
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or \
            (high is not None and (v > high or (high_open and v == high))):
        raise ValueError(f"{name}={value!r} is not accepted: use a number in {bounds}")
    return v


def check_int(name: str, value, low=None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is not accepted: use an int" + (f" >= {low}" if low is not None else ""))
    if low is not None and value < low:
        raise ValueError(f"{name}={value!r} is not accepted: use an int >= {low}")
    return int(value)


def check_optional_max_seq_length(value) -> int | None:
    """None keeps the model's (as Unsloth's get_peft_model ignores it); otherwise a positive int."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value <= 0:
        raise ValueError(f"max_seq_length={value!r} is not accepted: use a positive int, or None to keep the "
                         f"model's")
    return int(value)


def non_finite_report(array) -> str | None:
    """None when every value is finite (or the array holds no floats); else how many NaN / inf values it has."""
    x = np.asarray(array)
    if x.dtype.kind not in "fc" and x.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return None
    if np.isfinite(x).all():
        return None
    return f"{int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} infinite values (of {x.size})"


def check_finite(what: str, array, where: str) -> None:
    """Refuse a tensor holding NaN or inf, naming it and its file: a 4-bit load would smear one NaN over a
    whole quantization block, and a 16-bit one would carry it into every output."""
    report = non_finite_report(array)
    if report is not None:
        from fastlora_jax.convert.hf_checkpoint import CheckpointError
        raise CheckpointError(f"tensor {what!r} in {where!r} holds {report}; the checkpoint is corrupt "
                              f"(re-download or re-save it)")


BNB_QUANT_TYPES = ("nf4",)


def check_bnb_quant_type(config_dict: dict, stored_names, where: str) -> None:
    """A bitsandbytes checkpoint must be NF4: say so for fp4 instead of reporting missing nf4 tensors."""
    qc = config_dict.get("quantization_config") or {}
    quant_type = qc.get("bnb_4bit_quant_type", "nf4")
    if quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"{where}: quantization_config.bnb_4bit_quant_type={quant_type!r} is not supported; "
                         f"only 'nf4' bitsandbytes checkpoints load (re-quantize the 16-bit model with NF4)")
    other = sorted({n.rsplit("__", 1)[-1] for n in stored_names if ".quant_state.bitsandbytes__" in n} - {"nf4"})
    if other:
        raise ValueError(f"{where}: the checkpoint holds bitsandbytes {other[0]!r} weights; only 'nf4' is supported "
                         f"(re-quantize the 16-bit model with NF4)")


def check_positions(prompt_len: int, max_new_tokens: int, max_positions) -> None:
    """Positions past max_position_embeddings are outside what the model was trained on (and outside
    its rotary tables' range for some scalings): refuse rather than generate noise without a word."""
    if max_positions is None:
        return
    if prompt_len + max_new_tokens > int(max_positions):
        raise ValueError(f"input_ids has {prompt_len} tokens and max_new_tokens={max_new_tokens}: "
                         f"{prompt_len + max_new_tokens} positions exceed the model's max_position_embeddings="
                         f"{int(max_positions)}; shorten the prompt or lower max_new_tokens")


def check_prompt_not_empty(input_ids) -> None:
    """An empty prompt is empty, whatever dtype an empty list has (numpy makes it float64)."""
    size = getattr(input_ids, "size", None)
    if size is None:
        try:
            size = np.asarray(input_ids, dtype=object).size
        except ValueError:  # ragged: a list of prompts of different lengths
            return
    if size == 0 or (isinstance(input_ids, (list, tuple)) and any(
            isinstance(row, (list, tuple)) and len(row) == 0 for row in input_ids)):
        raise ValueError("input_ids is empty: generate needs at least one prompt token per row")


def check_generate_args(max_new_tokens, do_sample, temperature, top_p, top_k, seed, return_dict) -> None:
    """generate's settings, before any tracing: a NaN temperature would sample uniformly, a string one would
    fail inside a comparison."""
    check_int("max_new_tokens", max_new_tokens, low=0)
    check_optional_bool("do_sample", do_sample)
    check_number("temperature", temperature, low=0)
    check_number("top_p", top_p, low=0, high=1, low_open=True)
    check_int("top_k", top_k, low=0)
    check_int("seed", seed)
    check_bool("return_dict", return_dict)


def check_token_ids(eos_token_id, pad_token_id, vocab_size: int) -> None:
    """eos_token_id: None, an id or a list of ids; pad_token_id: None or an id; each in [0, vocab_size)."""
    def is_id(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and 0 <= v < vocab_size
    eos = eos_token_id.tolist() if hasattr(eos_token_id, "tolist") else eos_token_id
    if eos is not None and not is_id(eos) and not (isinstance(eos, (list, tuple)) and all(is_id(v) for v in eos)):
        raise ValueError(f"eos_token_id={eos_token_id!r} is not accepted: use None, a token id or a list of token "
                         f"ids in [0, {vocab_size})")
    if pad_token_id is not None and not is_id(pad_token_id):
        raise ValueError(f"pad_token_id={pad_token_id!r} is not accepted: use None or a token id in [0, {vocab_size})")
