"""LoRA configuration and module targeting, with Hugging Face PEFT 0.21's exact semantics, in pure Python.

Design: PEFT 0.21 is the specification. Adapters trained here are saved as PEFT adapters and must load
into `PeftModel.from_pretrained` onto the same modules with the same ranks and scalings, so every rule
below is a transcription of PEFT code, not a re-interpretation. This module imports neither torch nor
peft (users of the JAX library need not have them); it works on a list of `(dotted_name, kind)` module
descriptions in `named_modules()` order, which the JAX model produces with the HF torch names.
The test suite (tests/test_lora_targets.py) runs PEFT side by side as the oracle.

What mirrors what (peft 0.21):
- `LoraSpec.__post_init__`: `LoraConfig.__post_init__` (peft/tuners/lora/config.py): list targets
  become a set, regex `target_modules` forbids `layers_to_transform`/`layers_pattern`, `layers_pattern`
  needs `layers_to_transform`, "loftq" needs a `loftq_config`, a stray `loftq_config` is dropped with a
  warning. The argument names and defaults are Unsloth's `FastLanguageModel.get_peft_model`'s.
- `LoraSpec.to_peft_config_dict`: `PeftConfig.to_dict` + `PeftConfigMixin.save_pretrained` +
  `PeftModel.save_pretrained` (inference_mode=True, base_model_name_or_path `or None`, sets as lists).
- `resolve_targets`: `BaseTuner.inject_adapter` (peft/tuners/tuners_utils.py), i.e.
  `_maybe_include_all_linear_layers` ("all-linear"), `_find_minimal_target_modules` (the >= 20 entries
  rewrite, which can change layer filtering), `check_target_module_exists` (exclude_modules,
  modules_to_save exclusion, exact/suffix/regex matching, layers_to_transform/layers_pattern), its
  no-match error categories and warnings; `LoraModel._create_and_replace` + `get_pattern_key`
  (peft/utils/other.py) for per-module r/alpha; `LoraLayer.update_layer` for scaling;
  `LoraModel._create_new_module` for the "unsupported module type" error.
- `resolve_modules_to_save`: `_set_trainable` (peft/utils/other.py): plain `str.endswith` (not
  dot-bounded) over module names.
- `vision_target_modules`: not PEFT but Unsloth's `FastVisionModel.get_peft_model` finetune_* flags
  (vision/language parts, attention/MLP components), written from the rule in its docstring; it
  returns one regex, which PEFT then full-matches like any str target_modules.

Deliberate deviations (stricter, never looser): invalid values are rejected when the spec is built
instead of deep inside injection; `layers_to_transform` indices past the last layer raise (PEFT
silently ignores them); `target_modules=None` (PEFT's per-architecture default) and `[]` (only useful
with `target_parameters`, unsupported here) are rejected; PEFT init methods that need the torch
weights (pissa, olora, eva, corda, ...) raise NotImplementedError; a modules_to_save match that
contains a LoRA target raises TypeError like PEFT does when the match IS a LoRA target.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "PEFT_VERSION",
    "DEFAULT_TARGET_MODULES",
    "FrozenDict",
    "LoraSpec",
    "TargetInfo",
    "validate_lora_args",
    "check_target_module_exists",
    "resolve_targets",
    "resolve_modules_to_save",
    "layer_index_of",
    "vision_target_modules",
]

# The PEFT release whose semantics (and adapter_config.json "peft_version") this module reproduces.
PEFT_VERSION = "0.21.0"

# Unsloth's default target_modules.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# peft.utils.constants
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20

MODULE_KINDS = ("linear", "embedding", "other")
_SUPPORTED_KINDS = ("linear", "embedding")  # what LoRA's dispatch_default can wrap among our kinds
_BIAS_VALUES = ("none", "all", "lora_only")
_INIT_SUPPORTED = (True, False, "gaussian", "loftq")
# PEFT init methods that need the torch base weights or calibration data; named so the error is clear.
_INIT_UNSUPPORTED = ("pissa", "olora", "eva", "corda", "orthogonal", "mica", "lora_ga")
_LOFTQ_KEYS = ("loftq_bits", "loftq_iter")
# Task types whose PeftModel subclass does not rewrite the config on save (SEQ_CLS, TOKEN_CLS and
# QUESTION_ANS add their heads to modules_to_save, which is not mirrored here).
_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

# LoraConfig fields this library does not expose, with the defaults PEFT 0.21 writes for them.
_PEFT_FIXED_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "fan_in_fan_out": False,
    "kasa_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "peft_type": "LORA",
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}


class FrozenDict(Mapping):
    """Immutable, hashable, insertion-ordered mapping.

    Used for rank_pattern/alpha_pattern/loftq_config so that LoraSpec can be frozen and hashable.
    Equality between two FrozenDicts is order-sensitive on purpose: PEFT's `get_pattern_key` returns
    the FIRST matching pattern key, so {"q_proj": 8, "layers.1.self_attn.q_proj": 4} and the same
    items reversed give different ranks. Against a plain dict it compares like a dict.
    """

    __slots__ = ("_items", "_dict")

    def __init__(self, data: Mapping | Sequence[tuple[Any, Any]] = ()):
        d = dict(data)
        object.__setattr__(self, "_dict", d)
        object.__setattr__(self, "_items", tuple(d.items()))

    def __setattr__(self, name, value):
        raise AttributeError("FrozenDict is immutable")

    def __getitem__(self, key):
        return self._dict[key]

    def __iter__(self) -> Iterator:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        if isinstance(other, FrozenDict):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._dict!r})"

    def to_dict(self) -> dict:
        return dict(self._dict)


# --------------------------------------------------------------------------------------------------
# Validation helpers: each raises naming the argument, the value and what is accepted.


def _show(value):
    """Render normalized tuples as the lists the user passed, for error messages."""
    return list(value) if isinstance(value, tuple) else value


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_regex(arg: str, pattern: str, wrapped: str | None = None) -> None:
    """PEFT interpolates these strings into regexes at injection time; fail early and clearly instead."""
    try:
        re.compile(wrapped if wrapped is not None else pattern)
    except re.error as e:
        raise ValueError(f"{arg}={pattern!r} is not a valid regular expression ({e}).") from None


def _positive_int(arg: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{arg} must be a positive int (bool is not accepted), got {value!r} ({type(value).__name__}).")
    value = operator.index(value)
    if value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value!r}.")
    return value


def _positive_number(arg: str, value):
    if not _is_real(value):
        raise TypeError(f"{arg} must be a positive int or float (bool is not accepted), got {value!r} ({type(value).__name__}).")
    if _is_int(value):
        value = operator.index(value)
    else:
        value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{arg} must be a positive finite number, got {value!r}.")
    return value


def _bool(arg: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def _str_list(arg: str, value, *, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{arg} must be a list of str, got {value!r} ({type(value).__name__}).")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{arg} must contain only str, got element {item!r} ({type(item).__name__}) in {value!r}.")
        if item == "":
            raise ValueError(f"{arg} must not contain an empty string, got {value!r}.")
    if not items and not allow_empty:
        raise ValueError(f"{arg} must not be empty, got {value!r}.")
    return items


def _module_selector(arg: str, value, *, allow_none: bool):
    """target_modules / exclude_modules: a str is one full-match regex, a list is a set of names/suffixes."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(
            f"{arg}=None is not accepted (PEFT would pick a per-architecture default); pass a list of module "
            f"names such as {list(DEFAULT_TARGET_MODULES)!r}, a regex str, or 'all-linear'."
        )
    if isinstance(value, str):
        if value == "":
            raise ValueError(f"{arg}='' is not accepted; pass a list of module names or a non-empty regex str.")
        _check_regex(arg, value)
        return value
    # PEFT stores a list as a set (LoraConfig.__post_init__): order and duplicates do not matter.
    return tuple(sorted(set(_str_list(arg, value, allow_empty=allow_none))))


def _pattern_dict(arg: str, value, value_check) -> FrozenDict:
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        raise TypeError(f"{arg} must be a dict mapping module-name patterns to values, got {value!r} ({type(value).__name__}).")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or key == "":
            raise TypeError(f"{arg} keys must be non-empty str (module names or regex patterns), got key {key!r} in {value!r}.")
        _check_regex(f"{arg} key", key, rf"(.*\.)?({key})$")
        out[key] = value_check(f"{arg}[{key!r}]", v)
    return FrozenDict(out)


def _loftq_dict(value) -> FrozenDict:
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        if hasattr(value, "loftq_bits"):
            value = vars(value)  # a peft.LoftQConfig, as LoraConfig.__post_init__ does
        else:
            raise TypeError(f"loftq_config must be a dict with keys {list(_LOFTQ_KEYS)}, got {value!r} ({type(value).__name__}).")
    unknown = sorted(set(value) - set(_LOFTQ_KEYS), key=str)
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {unknown} in {dict(value)!r}; accepted keys: {list(_LOFTQ_KEYS)}.")
    out = {}
    for key, v in value.items():
        v = _positive_int(f"loftq_config[{key!r}]", v)
        if key == "loftq_bits" and v not in (2, 4, 8):
            raise ValueError(f"loftq_config['loftq_bits'] must be 2, 4 or 8, got {v!r}.")
        out[key] = v
    return FrozenDict(out)


def _init_lora_weights(value):
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"init_lora_weights must be one of {list(_INIT_SUPPORTED)}, got {value!r} ({type(value).__name__})."
        )
    if value in _INIT_SUPPORTED:
        return value
    if value in _INIT_UNSUPPORTED or value.startswith("pissa_niter_"):
        raise NotImplementedError(
            f"init_lora_weights={value!r} is a PEFT initialization that fastlora_jax does not implement; "
            f"supported: {list(_INIT_SUPPORTED)}."
        )
    raise ValueError(f"init_lora_weights={value!r} is not a known initialization; accepted: {list(_INIT_SUPPORTED)}.")


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """The validated LoRA config, one field per PEFT LoraConfig field we support.

    Frozen and hashable so a caller can tell "same config" from "different config" with `==` (e.g. to
    decide whether an existing adapter can be reused). Normalized forms: list-valued target_modules /
    exclude_modules become sorted tuples (PEFT keeps them as a set, so order is meaningless); other
    lists become tuples in the given order; dicts become `FrozenDict` (order kept: it matters, see there).
    Build with `LoraSpec.create(**unsloth_kwargs)` or directly; both validate.
    """

    r: int = 16
    target_modules: Union[str, tuple[str, ...]] = DEFAULT_TARGET_MODULES
    lora_alpha: Union[int, float] = 16
    lora_dropout: Union[int, float] = 0.0
    bias: str = "none"
    layers_to_transform: Union[None, int, tuple[int, ...]] = None
    layers_pattern: Union[None, str, tuple[str, ...]] = None
    use_rslora: bool = False
    modules_to_save: Union[None, tuple[str, ...]] = None
    init_lora_weights: Union[bool, str] = True
    loftq_config: FrozenDict = field(default_factory=FrozenDict)
    exclude_modules: Union[None, str, tuple[str, ...]] = None
    rank_pattern: FrozenDict = field(default_factory=FrozenDict)
    alpha_pattern: FrozenDict = field(default_factory=FrozenDict)
    use_dora: bool = False

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("r", _positive_int("r", self.r))
        put("lora_alpha", _positive_number("lora_alpha", self.lora_alpha))
        d = self.lora_dropout
        if not _is_real(d):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {d!r} ({type(d).__name__}).")
        if not (0 <= d < 1):
            raise ValueError(f"lora_dropout must be in [0, 1), got {d!r}.")
        put("lora_dropout", operator.index(d) if _is_int(d) else float(d))
        if not isinstance(self.bias, str) or self.bias not in _BIAS_VALUES:
            raise ValueError(f"bias={self.bias!r} is not accepted; accepted: {list(_BIAS_VALUES)}.")
        put("use_rslora", _bool("use_rslora", self.use_rslora))
        put("use_dora", _bool("use_dora", self.use_dora))
        put("target_modules", _module_selector("target_modules", self.target_modules, allow_none=False))
        put("exclude_modules", _module_selector("exclude_modules", self.exclude_modules, allow_none=True))

        ltt = self.layers_to_transform
        if ltt is not None:
            items = (ltt,) if not isinstance(ltt, (list, tuple)) else tuple(ltt)
            for i in items:
                if not _is_int(i):
                    raise TypeError(
                        f"layers_to_transform must be an int or a list of int, got {ltt!r} (element {i!r} is {type(i).__name__})."
                    )
                if i < 0:
                    raise ValueError(f"layers_to_transform must hold non-negative layer indices, got {ltt!r}.")
            items = tuple(operator.index(i) for i in items)
            put("layers_to_transform", items if isinstance(ltt, (list, tuple)) else items[0])

        lp = self.layers_pattern
        if lp is not None:
            if isinstance(lp, str):
                _check_regex("layers_pattern", lp, rf"(?:^|.*?\.){lp}\.(?P<idx>\d+)\.")
            else:
                lp = _str_list("layers_pattern", lp, allow_empty=True)
                for p in lp:
                    _check_regex("layers_pattern", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
                put("layers_pattern", lp)

        # LoraConfig.__post_init__ checks, same order and conditions.
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={_show(self.layers_to_transform)!r} cannot be used when target_modules is a str "
                f"(regex or 'all-linear'), got target_modules={self.target_modules!r}."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                f"layers_pattern={_show(self.layers_pattern)!r} cannot be used when target_modules is a str "
                f"(regex or 'all-linear'), got target_modules={self.target_modules!r}."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={_show(self.layers_pattern)!r} was given without layers_to_transform; "
                "when layers_pattern is specified, layers_to_transform must also be specified."
            )

        mts = self.modules_to_save
        if mts is not None:
            mts = _str_list("modules_to_save", mts, allow_empty=True)
            for m in mts:  # interpolated into a regex by check_target_module_exists
                _check_regex("modules_to_save", m, rf"(^|.*\.){m}($|\..*)")
            put("modules_to_save", mts)

        put("rank_pattern", _pattern_dict("rank_pattern", self.rank_pattern, _positive_int))
        put("alpha_pattern", _pattern_dict("alpha_pattern", self.alpha_pattern, _positive_number))
        put("init_lora_weights", _init_lora_weights(self.init_lora_weights))
        loftq = _loftq_dict(self.loftq_config)
        if self.init_lora_weights == "loftq":
            if not loftq:
                raise ValueError(
                    "loftq_config must be specified (e.g. {'loftq_bits': 4, 'loftq_iter': 1}) when "
                    f"init_lora_weights='loftq', got loftq_config={dict(loftq)!r}."
                )
        elif loftq:
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
            loftq = FrozenDict()
        put("loftq_config", loftq)

    @classmethod
    def create(
        cls,
        *,
        r: int = 16,
        target_modules=DEFAULT_TARGET_MODULES,
        lora_alpha=16,
        lora_dropout=0.0,
        bias: str = "none",
        layers_to_transform=None,
        layers_pattern=None,
        use_rslora: bool = False,
        modules_to_save=None,
        init_lora_weights=True,
        loftq_config=None,
        exclude_modules=None,
        rank_pattern=None,
        alpha_pattern=None,
        use_dora: bool = False,
    ) -> "LoraSpec":
        """Unsloth's `get_peft_model` argument names and defaults (loftq_config/rank_pattern/alpha_pattern
        default to {}). A str target_modules is a full-match regex as in PEFT (Unsloth iterates it per char)."""
        return cls(
            r=r,
            target_modules=target_modules,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            loftq_config=loftq_config,
            exclude_modules=exclude_modules,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_dora=use_dora,
        )

    @property
    def is_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND

    def to_peft_config_dict(
        self,
        base_model_name_or_path: str | None,
        task_type: str = "CAUSAL_LM",
        *,
        revision: str | None = None,
        inference_mode: bool = True,
        modules: Sequence[tuple[str, str]] | None = None,
        output_layer_names: Sequence[str] = ("lm_head",),
    ) -> dict:
        """The dict `PeftModel.save_pretrained` writes as adapter_config.json for the equivalent LoraConfig.

        Keys are sorted as in the file (json.dumps(sort_keys=True)). Set-valued fields are written as
        sorted lists (PEFT writes `list(set)`, in hash order). Pass `modules` (the same list given to
        `resolve_targets`) to also reproduce what injection does to `target_modules` before saving:
        "all-linear" expanded to module names and lists of >= 20 entries condensed to suffixes.
        Without `modules`, target_modules is written as configured (what `LoraConfig.to_dict()` holds).
        """
        if task_type not in _TASK_TYPES:
            raise ValueError(
                f"task_type={task_type!r} is not accepted; accepted: {list(_TASK_TYPES)} (the PeftModel classes of "
                "the other task types rewrite modules_to_save on save, which is not mirrored here)."
            )
        if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}.")
        if revision is not None and not isinstance(revision, str):
            raise TypeError(f"revision must be a str or None, got {revision!r}.")
        _bool("inference_mode", inference_mode)

        if modules is not None:
            modules = _check_modules(modules)
            target_modules = _effective_target_modules(self, modules, output_layer_names)
        else:
            target_modules = self.target_modules

        def as_json(value):
            if isinstance(value, (set, frozenset)):
                return sorted(value)
            if isinstance(value, tuple):
                return list(value)
            return value

        out = dict(_PEFT_FIXED_FIELDS)
        out.update(
            {
                "alpha_pattern": self.alpha_pattern.to_dict(),
                # PeftModel.save_pretrained / get_peft_model: `name_or_path or None`.
                "base_model_name_or_path": base_model_name_or_path or None,
                "bias": self.bias,
                "exclude_modules": as_json(self.exclude_modules),
                "inference_mode": inference_mode,
                "init_lora_weights": self.init_lora_weights,
                "layers_pattern": as_json(self.layers_pattern),
                "layers_to_transform": as_json(self.layers_to_transform),
                "loftq_config": self.loftq_config.to_dict(),
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "modules_to_save": as_json(self.modules_to_save),
                "peft_version": PEFT_VERSION,
                "r": self.r,
                "rank_pattern": self.rank_pattern.to_dict(),
                "revision": revision,
                "target_modules": as_json(target_modules),
                "task_type": task_type,
                "use_dora": self.use_dora,
                "use_rslora": self.use_rslora,
            }
        )
        return {k: out[k] for k in sorted(out)}


def validate_lora_args(**kwargs) -> LoraSpec:
    """Validate Unsloth-style get_peft_model LoRA arguments; returns the LoraSpec (see LoraSpec.create)."""
    return LoraSpec.create(**kwargs)


# --------------------------------------------------------------------------------------------------
# Targeting


@dataclass(frozen=True)
class TargetInfo:
    """One module that receives a LoRA adapter, with PEFT's per-module r/alpha/scaling."""

    name: str
    kind: str  # "linear" or "embedding"
    r: int
    lora_alpha: Union[int, float]
    scaling: float
    layer_index: int | None


class _Excluded:
    """PEFT's `_ExcludedModule`: falsy, but counted apart from plain non-matches for the error message."""

    def __bool__(self):
        return False


_EXCLUDED = _Excluded()


def _check_modules(modules) -> list[tuple[str, str]]:
    out = []
    for item in modules:
        if not (isinstance(item, tuple) or isinstance(item, list)) or len(item) != 2:
            raise TypeError(f"modules must be a list of (dotted_name, kind) pairs, got element {item!r}.")
        name, kind = item
        if not isinstance(name, str):
            raise TypeError(f"modules: module name must be a str, got {name!r}.")
        if kind not in MODULE_KINDS:
            raise ValueError(f"modules: kind of {name!r} must be one of {list(MODULE_KINDS)}, got {kind!r}.")
        out.append((name, kind))
    return out


def _find_minimal_target_modules(target_modules, other_module_names) -> set[str]:
    """Verbatim port of peft.tuners.tuners_utils._find_minimal_target_modules (injection-time rewrite)."""
    target_modules = set(target_modules)
    other_module_names = set(other_module_names)

    def generate_suffixes(s):
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_module_suffixes = {suffix for item in other_module_names for suffix in generate_suffixes(item)}
    target_modules_suffix_map = {item: generate_suffixes(item) for item in target_modules}
    required_suffixes: set[str] = set()
    for item, suffixes in sorted(target_modules_suffix_map.items(), key=lambda tup: tup[1]):
        for suffix in suffixes:
            if suffix in required_suffixes or suffix in other_module_suffixes:
                continue
            if not any(item.endswith("." + req_suffix) for req_suffix in required_suffixes):
                required_suffixes.add(suffix)
                break
    if not required_suffixes:
        return set(target_modules)
    return required_suffixes


def _effective_target_modules(spec: LoraSpec, modules, output_layer_names) -> Union[str, frozenset[str]]:
    """target_modules as PEFT's inject_adapter holds it when matching starts.

    "all-linear" (case-insensitive) -> every linear module name except the output layer
    (`model.get_output_embeddings()`'s name; for CausalLM that is lm_head, tied or not); then any
    list/set of >= 20 entries is condensed to the minimal distinguishing suffixes over all module names.
    """
    tm = spec.target_modules
    if spec.is_all_linear:
        excluded = set(output_layer_names)
        tm = frozenset(name for name, kind in modules if kind == "linear" and name not in excluded)
    if isinstance(tm, (tuple, frozenset)) and len(tm) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        key_list = [""] + [name for name, _ in modules]  # named_modules() includes the root ""
        tm_set = set(tm)
        suffixes = tuple("." + s for s in tm_set)
        names_no_target = [n for n in key_list if n not in tm_set and not n.endswith(suffixes)]
        new = _find_minimal_target_modules(tm_set, names_no_target)
        if len(new) < len(tm_set):
            tm = frozenset(new)
    if isinstance(tm, tuple):
        tm = frozenset(tm)
    return tm


def layer_index_of(key: str, layers_pattern: Union[None, str, Sequence[str]] = None) -> int | None:
    """The layer index PEFT's check_target_module_exists reads from a module name.

    With no (or an empty) layers_pattern: the first numbered segment that follows a named segment
    (lazy `.*?`, so MoE expert indices are not picked). With patterns: the first pattern (in order)
    for which `<pattern>.<digits>.` occurs.
    """
    if layers_pattern is None or len(layers_pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match:
        idx = match.groupdict().get("idx")
        if idx is not None:
            return int(idx)
    return None


def _check_target(spec: LoraSpec, target_modules, key: str):
    """peft.tuners.tuners_utils.check_target_module_exists, with target_modules already effective."""
    ex = spec.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return _EXCLUDED
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return _EXCLUDED

    # Adapters never go on modules_to_save modules nor inside them (dot-bounded, entries used as regex).
    if spec.modules_to_save:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in spec.modules_to_save):
            return _EXCLUDED

    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        # An exact full name bypasses the layers_to_transform filter below.
        return True
    found = any(key.endswith(f".{t}") for t in target_modules)
    ltt = spec.layers_to_transform
    using_layers = ltt is not None and (len(ltt) != 0 if isinstance(ltt, tuple) else True)
    if using_layers and found:
        idx = layer_index_of(key, spec.layers_pattern)
        if idx is None:
            return False
        return idx == ltt if isinstance(ltt, int) else idx in ltt
    return found


def check_target_module_exists(
    spec: LoraSpec, key: str, modules: Sequence[tuple[str, str]] | None = None, output_layer_names=("lm_head",)
) -> bool:
    """Whether PEFT would match `key` (exclusions applied). `modules` is needed for "all-linear" and for
    the >= 20-entry condensation; without it target_modules is used as configured."""
    if modules is not None:
        tm = _effective_target_modules(spec, _check_modules(modules), output_layer_names)
    elif spec.is_all_linear:
        raise ValueError("check_target_module_exists: target_modules='all-linear' needs the `modules` list.")
    else:
        tm = spec.target_modules if isinstance(spec.target_modules, str) else frozenset(spec.target_modules)
    return bool(_check_target(spec, tm, key))


def _get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key: the FIRST key k (in dict order) with re.match(rf"(.*\\.)?({k})$")."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _fmt_targets(tm) -> str:
    return repr(tm) if isinstance(tm, str) else repr(sorted(tm))


def resolve_targets(
    spec: LoraSpec,
    modules: Sequence[tuple[str, str]],
    num_layers: int,
    output_layer_names: Sequence[str] = ("lm_head",),
) -> list[TargetInfo]:
    """The modules PEFT 0.21's `get_peft_model` wraps with LoRA, in model order, with r/alpha/scaling.

    `modules`: `(dotted_name, kind)` pairs, kind in {"linear", "embedding", "other"}, in named_modules()
    order, root excluded. `num_layers`: number of decoder layers, to reject out-of-range
    layers_to_transform. `output_layer_names`: full names of the output layer(s) "all-linear" skips
    (`model.get_output_embeddings()` in PEFT; lm_head for CausalLM).
    Raises ValueError where PEFT raises (no match, unsupported module kind matched) and for
    layers_to_transform past the last layer.
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a LoraSpec, got {type(spec).__name__}.")
    modules = _check_modules(modules)
    num_layers = _positive_int("num_layers", num_layers)
    if isinstance(output_layer_names, str):
        output_layer_names = (output_layer_names,)

    ltt = spec.layers_to_transform
    if ltt is not None:
        bad = [i for i in ((ltt,) if isinstance(ltt, int) else ltt) if i >= num_layers]
        if bad:
            raise ValueError(
                f"layers_to_transform={_show(ltt)!r} has layer indices {bad} past the "
                f"last layer: the model has {num_layers} layers (valid indices 0..{num_layers - 1})."
            )

    tm = _effective_target_modules(spec, modules, output_layer_names)

    targeted: list[tuple[str, str]] = []
    excluded: list[str] = []
    unmatched: list[str] = []
    for name, kind in modules:
        if not name:
            continue
        result = _check_target(spec, tm, name)
        if isinstance(result, _Excluded):
            excluded.append(name)
        elif not result:
            unmatched.append(name)
        else:
            if kind not in _SUPPORTED_KINDS:
                # LoraModel._create_new_module raises on the first unsupported match, in model order.
                raise ValueError(
                    f"Target module {name!r} (kind {kind!r}) matched target_modules={_fmt_targets(spec.target_modules)} "
                    "but is not supported: LoRA can only be applied to linear and embedding modules "
                    "(PEFT: torch.nn.Linear, torch.nn.Embedding, ...)."
                )
            targeted.append((name, kind))

    if not targeted:
        linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, k in modules if k == "linear"})
        emb_leaves = sorted({n.rsplit(".", 1)[-1] for n, k in modules if k == "embedding"})
        hint = f" Linear modules in the model (leaf names): {linear_leaves}; embedding modules: {emb_leaves}."
        layers_note = ""
        if spec.layers_to_transform is not None:
            layers_note += f" Note: You specified 'layers_to_transform': {_show(spec.layers_to_transform)}."
        if spec.layers_pattern is not None:
            layers_note += f" You also specified 'layers_pattern': {_show(spec.layers_pattern)}."
        if excluded and not unmatched:
            msg = (
                "All modules were excluded. This is likely unintended. Check your `target_modules`, "
                "`exclude_modules` and `modules_to_save` configuration."
            )
        elif not excluded and unmatched:
            msg = (
                f"Target modules {_fmt_targets(spec.target_modules)} not found in the base model. Please check the "
                "target modules and try again." + layers_note
            )
        else:
            msg = (
                f"No modules were targeted for adaptation with target_modules={_fmt_targets(spec.target_modules)}. "
                "This might be caused by a combination of mismatched target modules and excluded modules "
                f"(exclude_modules={_show(spec.exclude_modules)!r}, modules_to_save={_show(spec.modules_to_save)!r})." + layers_note
            )
        raise ValueError(msg + hint)

    if spec.exclude_modules and not excluded:
        warnings.warn(
            f"You have passed exclude_modules={_show(spec.exclude_modules)} but no modules were excluded. "
            "Please check that exclude_modules was set correctly."
        )
    names = [n for n, _ in targeted]
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(spec, attr)
        unmatched_keys = sorted(k for k in patterns if not any(re.match(rf"(.*\.)?({k})$", n) for n in names))
        if unmatched_keys:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched_keys}.",
                RuntimeWarning,
            )

    out = []
    for name, kind in targeted:
        # LoraModel._create_and_replace: pattern lookup falls back to .get(full_name, default).
        r = spec.rank_pattern.get(_get_pattern_key(spec.rank_pattern.keys(), name), spec.r)
        alpha = spec.alpha_pattern.get(_get_pattern_key(spec.alpha_pattern.keys(), name), spec.lora_alpha)
        scaling = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
        out.append(
            TargetInfo(
                name=name, kind=kind, r=r, lora_alpha=alpha, scaling=scaling,
                layer_index=layer_index_of(name, spec.layers_pattern),
            )
        )
    return out


def resolve_modules_to_save(
    spec: LoraSpec,
    modules: Sequence[tuple[str, str]],
    lora_targets: Sequence[Union[TargetInfo, str]] | None = None,
) -> list[str]:
    """Names of the modules that get a trainable full copy (PEFT's ModulesToSaveWrapper), in model order.

    PEFT's `_set_trainable` matches with a plain `name.endswith(entry)`, NOT dot-bounded ("head" matches
    "lm_head"), while LoRA's exclusion of modules_to_save is dot-bounded; a module matched here that is
    also a LoRA target makes PEFT raise TypeError ("modules_to_save cannot be applied to modules of type
    lora.Linear"). Pass `lora_targets` (resolve_targets' result) to get that error; we also raise it when
    a match contains a LoRA target (PEFT would wrap a subtree holding LoRA layers). An entry that matches
    nothing is silently ignored, as in PEFT.
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a LoraSpec, got {type(spec).__name__}.")
    modules = _check_modules(modules)
    if not spec.modules_to_save:
        return []
    entries = spec.modules_to_save
    matched = [name for name, _ in modules if name and any(name.endswith(m) for m in entries)]
    if lora_targets:
        target_names = [t.name if isinstance(t, TargetInfo) else t for t in lora_targets]
        for name in matched:
            clash = [t for t in target_names if t == name or t.startswith(name + ".")]
            if clash:
                raise TypeError(
                    f"modules_to_save={list(entries)!r} matches {name!r}, which is or contains the LoRA target(s) "
                    f"{clash}: modules_to_save cannot be applied to a module that has a LoRA adapter "
                    "(modules_to_save matches any name ending with an entry, not only whole dotted components)."
                )
    return matched


# --------------------------------------------------------------------------------------------------
# Vision-language selection: FastVisionModel.get_peft_model's finetune_* flags (Unsloth's semantics,
# written from the rule below; the result is one regex string that PEFT full-matches).

# Substrings looked for in the name segments above a module's leaf (case-sensitive, as in Unsloth).
VISION_TAGS = ("vision", "image", "visual", "patch")
LANGUAGE_TAGS = ("language", "text")
ATTENTION_TAGS = ("self_attn", "attention", "attn")
MLP_TAGS = ("mlp", "feed_forward", "ffn", "dense")

_FLAG_NAMES = (
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
)
_INDEX_SEGMENT = re.compile(r"\d+")


def _tagged(context: Sequence[str], tags: Sequence[str]) -> bool:
    return any(tag in segment for segment in context for tag in tags)


def _plain_decoder_layer(context: Sequence[str]) -> bool:
    """`model.layers.<N>` as consecutive segments (a text-only model's decoder, or older VLM layouts)."""
    return any(
        context[i] == "model" and context[i + 1] == "layers" and _INDEX_SEGMENT.fullmatch(context[i + 2])
        for i in range(len(context) - 2)
    )


def _module_parts(name: str) -> tuple[bool, bool, bool, bool]:
    """(vision, language, attention, mlp) for one dotted module name, from the segments above the leaf."""
    context = name.split(".")[:-1]
    return (
        _tagged(context, VISION_TAGS),
        _tagged(context, LANGUAGE_TAGS) or _plain_decoder_layer(context),
        _tagged(context, ATTENTION_TAGS),
        _tagged(context, MLP_TAGS),
    )


def _selection_regex(selected: Sequence[str], all_names: Sequence[str]) -> str:
    """A readable regex that `re.fullmatch`es exactly `selected` among `all_names`.

    Layer indices are written `\\d+` where every module of that shape is selected (all layers), else the
    names are listed; leaves that share a parent are written `parent\\.(?:a|b)`. The result is checked
    against every module name, with a plain list of the escaped names as the fallback.
    """
    selected_set = set(selected)

    def shape(name: str) -> tuple:
        return tuple(None if _INDEX_SEGMENT.fullmatch(s) else s for s in name.split("."))

    def segment_re(s) -> str:
        return r"\d+" if s is None else re.escape(s)

    names_by_shape: dict[tuple, list[str]] = {}
    for name in all_names:
        names_by_shape.setdefault(shape(name), []).append(name)
    selected_by_shape: dict[tuple, list[str]] = {}
    for name in selected:
        selected_by_shape.setdefault(shape(name), []).append(name)

    leaves_by_parent: dict[str, list[str]] = {}  # insertion order = model order
    for sh, names in selected_by_shape.items():
        if all(n in selected_set for n in names_by_shape[sh]):
            rows = [[segment_re(s) for s in sh]]
        else:  # only some layers of this shape are selected: spell the names out
            rows = [[re.escape(s) for s in n.split(".")] for n in names]
        for row in rows:
            leaves = leaves_by_parent.setdefault(r"\.".join(row[:-1]), [])
            if row[-1] not in leaves:
                leaves.append(row[-1])

    pieces = []
    for parent, leaves in leaves_by_parent.items():
        leaf_re = leaves[0] if len(leaves) == 1 else "(?:" + "|".join(leaves) + ")"
        pieces.append(leaf_re if parent == "" else parent + r"\." + leaf_re)
    regex = pieces[0] if len(pieces) == 1 else "(?:" + "|".join(pieces) + ")"

    compiled = re.compile(regex)
    if {n for n in all_names if compiled.fullmatch(n)} != selected_set:  # pragma: no cover - safety net
        regex = "(?:" + "|".join(re.escape(n) for n in selected) + ")"
    return regex


def vision_target_modules(
    module_list: Sequence[tuple[str, str]],
    target_modules=None,
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
) -> str:
    """The `target_modules` regex for `FastVisionModel.get_peft_model`'s finetune_* flags.

    `module_list`: `(dotted_name, kind)` pairs, kind in {"linear", "embedding", "other"}, in torch
    `named_modules()` order (a family's `module_list(cfg)`). Returns ONE regex string; PEFT
    `re.fullmatch`es it against every module name (a str `target_modules`), so it selects exactly the
    modules chosen below, and it is what adapter_config.json records as `target_modules`.

    The rule (Unsloth's `FastVisionModel` selection, written out here):

    1. Candidates.
       - `target_modules` None or "all-linear" (any case): the `kind == "linear"` modules whose leaf name
         (last dotted component) occurs on more than one linear module. One-off linears are out:
         `lm_head`, the patch merger's `mlp.0` / `mlp.2`, a multimodal projector. (So is a layer kind that a
         1-layer tower has only once, e.g. Qwen2-VL's vision `mlp.fc1` at vision depth 1.)
       - a list/tuple/set of names: the modules (any kind) that PEFT's list matching picks, i.e. whose name
         equals an entry or ends with "." + entry; then narrowed by the flags like the candidates above.
       - any other str: a regex used as given (flags are not applied; a warning says so if one is False).
         It must full-match at least one module name.
    2. Part flags. Only the segments ABOVE the leaf are looked at (the leaf's own name never decides, so
       an attention output named `dense`, e.g. phi's `self_attn.dense`, is attention, not MLP). Substring
       tests, case-sensitive:
       - vision tower: a segment contains one of VISION_TAGS ("vision", "image", "visual", "patch"),
         e.g. `model.visual.blocks.3.attn.qkv`;
       - language model: a segment contains one of LANGUAGE_TAGS ("language", "text"), e.g.
         `model.language_model.layers.0.self_attn.q_proj`, or the segments `model.layers.<N>` occur in a
         row (a text-only model's `model.layers.0.mlp.up_proj`, and older VLM layouts).
       A candidate is kept if it lies in a selected part (finetune_vision_layers / finetune_language_layers);
       modules in neither part are never selected.
    3. Component flags, same test on the same segments: attention = ATTENTION_TAGS ("self_attn",
       "attention", "attn"), MLP = MLP_TAGS ("mlp", "feed_forward", "ffn", "dense"). A candidate is kept if
       it is in a selected component (finetune_attention_modules / finetune_mlp_modules).
    4. The kept modules are written as a regex (`\\d+` for layer indices where all layers are kept) that
       full-matches exactly them and nothing else in `module_list`.

    On Qwen2.5-VL with every flag True this selects `model.visual.blocks.N.attn.{qkv,proj}`,
    `model.visual.blocks.N.mlp.{gate,up,down}_proj` and the language model's q/k/v/o/gate/up/down_proj;
    not `lm_head`, the merger, `patch_embed.proj` (a Conv3d) nor the embeddings.

    A str result cannot be combined with layers_to_transform / layers_pattern (PEFT's LoraConfig forbids
    them with a str target_modules): a caller that offers both must fold the layer choice into the
    selection (e.g. pass the chosen layers' full module names as the list). `module_list` must always be
    the model's complete list: the regex is exact against it (`\\d+` stands for every index it holds).

    Raises ValueError when both part flags or both component flags are False (naming them), when the
    selection is empty (with what the candidates were), and for an invalid `target_modules`; TypeError for
    non-bool flags or a malformed `module_list`.
    """
    modules = [(n, k) for n, k in _check_modules(module_list) if n]
    flags = {
        "finetune_vision_layers": finetune_vision_layers,
        "finetune_language_layers": finetune_language_layers,
        "finetune_attention_modules": finetune_attention_modules,
        "finetune_mlp_modules": finetune_mlp_modules,
    }
    for arg, value in flags.items():
        _bool(arg, value)
    names = [n for n, _ in modules]

    all_linear = target_modules is None or (
        isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
    )
    if isinstance(target_modules, str) and not all_linear:
        if target_modules == "":
            raise ValueError("target_modules='' is not accepted; pass None, 'all-linear', a list of module names or a regex str.")
        _check_regex("target_modules", target_modules)
        off = [arg for arg, value in flags.items() if not value]
        if off:
            warnings.warn(
                f"target_modules is a regex str ({target_modules!r}), used as given: {', '.join(a + '=False' for a in off)} "
                "is ignored. Pass target_modules=None, 'all-linear' or a list of names for the flags to apply."
            )
        compiled = re.compile(target_modules)
        if not any(compiled.fullmatch(n) for n in names):
            linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, k in modules if k == "linear"})
            raise ValueError(
                f"target_modules={target_modules!r} full-matches no module name of the model (a str is a regex "
                "matched against whole dotted names such as 'model.language_model.layers.0.self_attn.q_proj'; "
                f"pass a list to match by name). Linear modules in the model (leaf names): {linear_leaves}."
            )
        return target_modules

    missing = []
    if not (finetune_vision_layers or finetune_language_layers):
        missing.append(
            "finetune_vision_layers=False and finetune_language_layers=False select no part of the model "
            "(set at least one to True)"
        )
    if not (finetune_attention_modules or finetune_mlp_modules):
        missing.append(
            "finetune_attention_modules=False and finetune_mlp_modules=False select no kind of module "
            "(set at least one to True)"
        )
    if missing:
        raise ValueError("; ".join(missing) + ".")

    if all_linear:
        linear = [n for n, k in modules if k == "linear"]
        counts: dict[str, int] = {}
        for n in linear:
            leaf = n.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
        candidates = [n for n in linear if counts[n.rsplit(".", 1)[-1]] > 1]
        described = (
            f"target_modules={target_modules!r} (candidates: the linear modules whose leaf name occurs more than once, "
            f"leaf names {sorted({n.rsplit('.', 1)[-1] for n in candidates})})"
        )
    else:
        entries = _str_list("target_modules", target_modules, allow_empty=False)
        candidates = [n for n in names if n in entries or any(n.endswith("." + e) for e in entries)]
        described = f"target_modules={list(entries)!r} ({len(candidates)} modules match these names)"

    selected = []
    tally = [0, 0, 0, 0]
    for n in candidates:
        vision, language, attention, mlp = parts = _module_parts(n)
        tally = [t + int(p) for t, p in zip(tally, parts)]
        if ((finetune_vision_layers and vision) or (finetune_language_layers and language)) and (
            (finetune_attention_modules and attention) or (finetune_mlp_modules and mlp)
        ):
            selected.append(n)

    if not selected:
        flag_text = ", ".join(f"{a}={v}" for a, v in flags.items())
        raise ValueError(
            f"No module selected by {described} with {flag_text}. Of the {len(candidates)} candidates, "
            f"{tally[0]} are in the vision tower (a name segment containing one of {list(VISION_TAGS)}), "
            f"{tally[1]} in the language model (one of {list(LANGUAGE_TAGS)}, or 'model.layers.<N>'), "
            f"{tally[2]} attention (one of {list(ATTENTION_TAGS)}) and {tally[3]} MLP (one of {list(MLP_TAGS)})."
        )
    return _selection_regex(selected, names)
