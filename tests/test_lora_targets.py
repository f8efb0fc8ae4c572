"""fastlora_jax.lora_config against PEFT 0.21 as the oracle.

Every targeting case builds a fresh tiny random HF Llama, runs `peft.get_peft_model` with the same
arguments, and compares PEFT's targeted modules and per-module r / lora_alpha / scaling with
`resolve_targets` on the model's `(name, kind)` list. Config dicts are compared with what
`PeftModel.save_pretrained` writes to adapter_config.json.
"""

import json
import math
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastlora_jax.lora_config import (  # noqa: E402
    DEFAULT_TARGET_MODULES,
    FrozenDict,
    LoraSpec,
    TargetInfo,
    check_target_module_exists,
    layer_index_of,
    resolve_modules_to_save,
    resolve_targets,
    validate_lora_args,
)

# Unsloth's get_peft_model defaults, spelled for LoraConfig (whose own defaults differ: r=8, alpha=8).
UNSLOTH_DEFAULTS = dict(
    r=16,
    target_modules=list(DEFAULT_TARGET_MODULES),
    lora_alpha=16,
    lora_dropout=0.0,
    bias="none",
    layers_to_transform=None,
    layers_pattern=None,
    use_rslora=False,
    modules_to_save=None,
    init_lora_weights=True,
    loftq_config={},
    exclude_modules=None,
    rank_pattern={},
    alpha_pattern={},
    use_dora=False,
)


def make_model(num_layers=2, tied=False, hidden=32):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        intermediate_size=64,
        vocab_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def module_list(model):
    return [
        (
            name,
            "linear"
            if isinstance(m, torch.nn.Linear)
            else "embedding"
            if isinstance(m, torch.nn.Embedding)
            else "other",
        )
        for name, m in model.named_modules()
        if name
    ]


def peft_kwargs(kw):
    out = dict(UNSLOTH_DEFAULTS)
    out.update(kw)
    return out


def run_peft(model, kw):
    """(targets as [(name, r, alpha, scaling)], peft_model) from PEFT itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **peft_kwargs(kw)))
    base = pm.base_model.model
    rows = []
    for name in pm.base_model.targeted_module_names:
        layer = base.get_submodule(name)
        rows.append((name, layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]))
    return rows, pm


def run_ours(model, kw, output_layer_names=("lm_head",)):
    spec = LoraSpec.create(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = resolve_targets(spec, module_list(model), model.config.num_hidden_layers, output_layer_names)
    return [(t.name, t.r, t.lora_alpha, t.scaling) for t in infos], infos


def assert_same(peft_rows, our_rows):
    assert [r[0] for r in our_rows] == [r[0] for r in peft_rows]
    for (n, r, a, s), (pn, pr, pa, ps) in zip(our_rows, peft_rows):
        assert (n, r, a) == (pn, pr, pa)
        assert type(a) is type(pa), n
        assert math.isclose(s, ps, rel_tol=0, abs_tol=0), (n, s, ps)


# (id, kwargs, num_layers, tied)
TARGET_CASES = [
    ("default", {}, 2, False),
    ("default_tied", {}, 2, True),
    ("suffix_forms", dict(target_modules=["self_attn.q_proj", "v_proj", "mlp.down_proj"]), 2, False),
    ("non_dot_bounded_suffix_no_match_part", dict(target_modules=["proj", "attn.q_proj", "v_proj"]), 2, False),
    ("full_name", dict(target_modules=["model.layers.1.self_attn.k_proj"]), 2, False),
    ("tuple_targets", dict(target_modules=("q_proj", "o_proj")), 2, False),
    ("regex_qv", dict(target_modules=r".*\.(q|v)_proj"), 3, False),
    ("regex_layers01", dict(target_modules=r"model\.layers\.[01]\..*proj"), 3, False),
    ("regex_fullmatch_not_search", dict(target_modules=r"q_proj|.*mlp\.up_proj"), 2, False),
    ("all_linear_untied", dict(target_modules="all-linear"), 2, False),
    ("all_linear_tied", dict(target_modules="all-linear"), 2, True),
    ("all_linear_4_layers_condensed", dict(target_modules="all-linear"), 4, False),
    ("all_linear_upper", dict(target_modules="ALL-LINEAR"), 2, True),
    ("all_linear_exclude", dict(target_modules="all-linear", exclude_modules=["o_proj", "mlp.up_proj"]), 2, False),
    ("exclude_list", dict(exclude_modules=["q_proj", "layers.0.mlp.down_proj"]), 2, False),
    ("exclude_regex", dict(exclude_modules=r".*layers\.1\..*"), 2, False),
    ("exclude_regex_fullmatch", dict(exclude_modules=r"q_proj"), 2, False),
    ("ltt_int", dict(layers_to_transform=1), 3, False),
    ("ltt_list_pattern_layers", dict(layers_to_transform=[0, 2], layers_pattern="layers"), 3, False),
    ("ltt_list_pattern_none", dict(layers_to_transform=[0, 2]), 3, False),
    ("ltt_pattern_list", dict(layers_to_transform=[1], layers_pattern=["h", "layers"]), 3, False),
    ("ltt_pattern_empty_str", dict(layers_to_transform=[1], layers_pattern=""), 3, False),
    ("ltt_empty_list_no_filter", dict(layers_to_transform=[]), 2, False),
    ("ltt_exact_name_bypasses_filter",
     dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]), 2, False),
    ("rslora", dict(r=8, lora_alpha=16, use_rslora=True), 2, False),
    ("float_alpha_r1", dict(r=1, lora_alpha=2.5), 2, False),
    ("rank_pattern_leaf", dict(rank_pattern={"q_proj": 4}), 2, False),
    ("rank_pattern_full", dict(rank_pattern={"model.layers.1.self_attn.q_proj": 32}), 2, False),
    ("rank_pattern_caret", dict(rank_pattern={"^model.layers.0.self_attn.k_proj": 2}), 2, False),
    ("rank_pattern_regex", dict(rank_pattern={r"layers\.1\.mlp\..*": 8, r"(q|k)_proj": 4}), 2, False),
    ("rank_pattern_first_wins",
     dict(rank_pattern={"q_proj": 8, "model.layers.1.self_attn.q_proj": 4}), 2, False),
    ("rank_pattern_first_wins_reversed",
     dict(rank_pattern={"model.layers.1.self_attn.q_proj": 4, "q_proj": 8}), 2, False),
    ("rank_pattern_partial_leaf_no_match", dict(rank_pattern={"proj": 4, "_proj": 2}), 2, False),
    ("alpha_pattern", dict(alpha_pattern={"v_proj": 64, r"mlp\..*": 4}), 2, False),
    ("alpha_pattern_float", dict(alpha_pattern={"o_proj": 0.5}), 2, False),
    ("patterns_rslora", dict(use_rslora=True, rank_pattern={"q_proj": 64}, alpha_pattern={"k_proj": 3}), 2, False),
    ("embed_targets", dict(target_modules=["embed_tokens", "q_proj"]), 2, False),
    ("embed_targets_tied", dict(target_modules=["embed_tokens", "q_proj"], r=4), 2, True),
    ("lm_head_target", dict(target_modules=["lm_head", "v_proj"]), 2, False),
    ("regex_embed_and_lm_head", dict(target_modules=r".*(embed_tokens|lm_head)"), 2, False),
    ("m2s_lm_head_all_linear", dict(target_modules="all-linear", modules_to_save=["lm_head"]), 2, False),
    ("m2s_embed", dict(modules_to_save=["embed_tokens"]), 2, True),
    ("m2s_excludes_lora_target", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"]), 2, False),
    ("m2s_excludes_subtree", dict(target_modules=["down_proj", "q_proj"], modules_to_save=["layers.0.mlp"]), 2, False),
    ("m2s_head_suffix", dict(target_modules=["q_proj"], modules_to_save=["head"]), 2, False),
    ("dora", dict(use_dora=True, target_modules=["q_proj", "embed_tokens"]), 2, False),
]


@pytest.mark.parametrize("kw,num_layers,tied", [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES])
def test_targets_match_peft(kw, num_layers, tied):
    peft_rows, pm = run_peft(make_model(num_layers, tied), kw)
    model = make_model(num_layers, tied)
    our_rows, infos = run_ours(model, kw)
    assert_same(peft_rows, our_rows)
    # kinds and layer indices
    kinds = dict(module_list(model))
    for t in infos:
        assert isinstance(t, TargetInfo)
        assert t.kind == kinds[t.name]
        expected = int(t.name.split(".")[2]) if t.name.startswith("model.layers.") else None
        assert t.layer_index == expected
    # modules_to_save: the names PEFT wrapped in a ModulesToSaveWrapper
    spec = LoraSpec.create(**kw)
    wrapped = [
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    ]
    assert resolve_modules_to_save(spec, module_list(model), infos) == wrapped


def test_many_full_names_are_condensed_then_layer_filtered():
    # PEFT condenses >= 20 target_modules entries to suffixes before matching, so full names that would
    # bypass layers_to_transform (see ltt_exact_name_bypasses_filter) are then layer-filtered.
    full = [n for n, k in module_list(make_model(4)) if k == "linear" and n != "lm_head"]
    assert len(full) >= 20
    kw = dict(target_modules=full, layers_to_transform=[1])
    peft_rows, _ = run_peft(make_model(4), kw)
    our_rows, _ = run_ours(make_model(4), kw)
    assert_same(peft_rows, our_rows)
    assert {r[0].split(".")[2] for r in our_rows} == {"1"}
    # below the threshold the exact names win over the filter
    kw = dict(target_modules=full[:19], layers_to_transform=[1])
    peft_rows, _ = run_peft(make_model(4), kw)
    our_rows, _ = run_ours(make_model(4), kw)
    assert_same(peft_rows, our_rows)
    assert len(our_rows) == 19


def test_output_layer_names_argument():
    model = make_model(2)
    spec = LoraSpec.create(target_modules="all-linear")
    names = [t.name for t in resolve_targets(spec, module_list(model), 2, output_layer_names=())]
    assert "lm_head" in names
    names = [t.name for t in resolve_targets(spec, module_list(model), 2, output_layer_names="lm_head")]
    assert "lm_head" not in names


def test_check_target_module_exists_and_layer_index():
    mods = module_list(make_model(2))
    spec = LoraSpec.create(target_modules=["q_proj"], layers_to_transform=1)
    assert check_target_module_exists(spec, "model.layers.1.self_attn.q_proj")
    assert not check_target_module_exists(spec, "model.layers.0.self_attn.q_proj")
    assert not check_target_module_exists(spec, "model.layers.1.self_attn.xq_proj")
    all_lin = LoraSpec.create(target_modules="all-linear")
    assert check_target_module_exists(all_lin, "model.layers.0.mlp.up_proj", mods)
    assert not check_target_module_exists(all_lin, "lm_head", mods)
    with pytest.raises(ValueError, match="all-linear"):
        check_target_module_exists(all_lin, "lm_head")
    # lazy: first numbered segment, not a nested (MoE expert) index
    assert layer_index_of("model.layers.3.mlp.experts.7.w1") == 3
    assert layer_index_of("transformer.h.2.attn.c_attn", ["layers", "h"]) == 2
    assert layer_index_of("lm_head") is None


# ------------------------------------------------------------------ errors PEFT raises too


ERROR_CASES = [
    ("no_match", dict(target_modules=["foo_proj"]), 2, False),
    ("regex_no_match", dict(target_modules=r"q_proj"), 2, False),
    ("all_excluded_by_exclude", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), 2, False),
    ("all_excluded_by_m2s", dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), 2, False),
    ("layer_filter_matches_nothing", dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="h"), 2, False),
    ("regex_hits_norm", dict(target_modules=r".*norm"), 2, False),
    ("regex_hits_mlp_container", dict(target_modules=r".*mlp.*"), 2, False),
    ("list_hits_attention_container", dict(target_modules=["self_attn", "q_proj"]), 2, False),
]


@pytest.mark.parametrize("case,kw,num_layers,tied", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_match_peft(case, kw, num_layers, tied):
    with pytest.raises(ValueError):
        run_peft(make_model(num_layers, tied), kw)
    with pytest.raises(ValueError) as ei:
        run_ours(make_model(num_layers, tied), kw)
    msg = str(ei.value)
    if "_hits_" in case:
        assert "is not supported" in msg
    else:
        # no-match errors list what exists and the target_modules value
        assert "q_proj" in msg and "down_proj" in msg
        tm = kw["target_modules"]
        assert (tm if isinstance(tm, str) else tm[0]) in msg


def test_unsupported_kind_message_names_module():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm.*'other'"):
        run_ours(make_model(2), dict(target_modules=r".*norm"))


CONFIG_ERROR_CASES = [
    ("pattern_without_ltt", dict(layers_pattern="layers")),
    ("regex_with_ltt", dict(target_modules=r".*q_proj", layers_to_transform=[0])),
    ("regex_with_pattern", dict(target_modules=r".*q_proj", layers_pattern="layers")),
    ("all_linear_with_ltt", dict(target_modules="all-linear", layers_to_transform=0)),
    ("loftq_without_config", dict(init_lora_weights="loftq")),
]


@pytest.mark.parametrize("kw", [c[1] for c in CONFIG_ERROR_CASES], ids=[c[0] for c in CONFIG_ERROR_CASES])
def test_config_errors_match_peft(kw):
    with pytest.raises(ValueError):
        LoraConfig(**peft_kwargs(kw))
    with pytest.raises(ValueError) as ei:
        LoraSpec.create(**kw)
    assert any(k in str(ei.value) for k in kw)


def test_layers_past_last_layer():
    # PEFT silently ignores them; we refuse (naming the argument, the value and the layer count).
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0, 3\].*3\].*2 layers"):
        run_ours(make_model(2), dict(layers_to_transform=[0, 3]))
    with pytest.raises(ValueError, match=r"layers_to_transform=2 .*2 layers"):
        run_ours(make_model(2), dict(layers_to_transform=2))


def test_modules_to_save_overlapping_lora_target_is_type_error_like_peft():
    kw = dict(target_modules=["q_proj"], modules_to_save=["_proj"])  # endswith, not dot-bounded
    with pytest.raises(TypeError):
        run_peft(make_model(2), kw)
    model = make_model(2)
    spec = LoraSpec.create(**kw)
    targets = resolve_targets(spec, module_list(model), 2)
    with pytest.raises(TypeError, match="modules_to_save"):
        resolve_modules_to_save(spec, module_list(model), targets)
    assert "model.layers.0.self_attn.q_proj" in resolve_modules_to_save(spec, module_list(model))


def test_modules_to_save_nested_and_unmatched():
    kw = dict(target_modules=["q_proj"], modules_to_save=["mlp", "down_proj", "nothing_here"])
    _, pm = run_peft(make_model(2), kw)
    wrapped = [n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    spec = LoraSpec.create(**kw)
    assert resolve_modules_to_save(spec, module_list(make_model(2))) == wrapped
    assert resolve_modules_to_save(LoraSpec.create(), module_list(make_model(2))) == []


# ------------------------------------------------------------------ adapter_config.json


def _norm(d):
    d = dict(d)
    for k in ("target_modules", "exclude_modules"):
        if isinstance(d.get(k), (list, set, frozenset)):
            d[k] = sorted(d[k])
    return d


SAVE_CASES = [
    ("default", {}, 2, False, ""),
    ("named_model", dict(r=8, lora_alpha=32, lora_dropout=0.05), 2, False, "org/tiny-llama"),
    ("regex", dict(target_modules=r".*\.(q|v)_proj", bias="lora_only"), 2, False, ""),
    ("all_linear_2", dict(target_modules="all-linear"), 2, True, ""),
    ("all_linear_4", dict(target_modules="all-linear", exclude_modules=r".*layers\.3\..*"), 4, False, ""),
    ("ltt_int", dict(layers_to_transform=1, layers_pattern="layers", use_rslora=True), 2, False, ""),
    ("ltt_list", dict(layers_to_transform=[1, 0], layers_pattern=["layers"]), 2, False, ""),
    ("patterns", dict(rank_pattern={"q_proj": 4, "model.layers.1.mlp.up_proj": 2}, alpha_pattern={"v_proj": 1.5},
                      exclude_modules=["k_proj"]), 2, False, ""),
    ("m2s_dora_gaussian", dict(modules_to_save=["lm_head", "embed_tokens"], use_dora=True,
                               init_lora_weights="gaussian", lora_dropout=0), 2, False, ""),
    ("init_false_float_alpha", dict(init_lora_weights=False, lora_alpha=24.0), 2, False, ""),
]


@pytest.mark.parametrize("kw,num_layers,tied,name", [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_adapter_config_json_matches_peft(tmp_path, kw, num_layers, tied, name):
    model = make_model(num_layers, tied)
    model.name_or_path = name
    _, pm = run_peft(model, kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not find a config file in org/tiny-llama" (offline)
        pm.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())

    spec = LoraSpec.create(**kw)
    ours = spec.to_peft_config_dict(name, modules=module_list(make_model(num_layers, tied)))
    assert list(ours) == sorted(written)  # same keys, file order
    # JSON round trip so tuples/ints/floats compare as they would in the file
    ours_json = json.loads(json.dumps(ours))
    written, ours_json = _norm(written), _norm(ours_json)
    for key in written:
        assert ours_json[key] == written[key], key
        assert type(ours_json[key]) is type(written[key]), key


@pytest.mark.parametrize("kw", [c[1] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_config_dict_matches_loraconfig_to_dict(kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = LoraConfig(task_type="CAUSAL_LM", **peft_kwargs(kw)).to_dict()
    ours = LoraSpec.create(**kw).to_peft_config_dict(None, inference_mode=False)
    assert set(ours) == set(expected)
    # sets -> sorted lists, enums (PeftType is a str Enum) -> their JSON form
    expected = json.loads(json.dumps(_norm(expected)))
    ours = json.loads(json.dumps(_norm(ours)))
    for key in expected:
        assert ours[key] == expected[key], key
        assert type(ours[key]) is type(expected[key]), key


def test_to_peft_config_dict_task_type_and_revision():
    spec = LoraSpec.create()
    d = spec.to_peft_config_dict("x/y", revision="main")
    assert (d["task_type"], d["revision"], d["inference_mode"], d["peft_type"]) == ("CAUSAL_LM", "main", True, "LORA")
    assert d["peft_version"] == peft.__version__
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        spec.to_peft_config_dict("x/y", task_type="SEQ_CLS")


# ------------------------------------------------------------------ validation


def test_defaults_are_unsloths():
    spec = LoraSpec.create()
    assert spec == LoraSpec()
    assert spec.r == 16 and spec.lora_alpha == 16 and spec.lora_dropout == 0.0 and spec.bias == "none"
    assert set(spec.target_modules) == set(DEFAULT_TARGET_MODULES)
    assert spec.loftq_config == {} and spec.rank_pattern == {} and spec.alpha_pattern == {}
    assert spec.init_lora_weights is True and spec.use_rslora is False and spec.use_dora is False
    assert validate_lora_args(r=8) == LoraSpec.create(r=8)


def test_equality_and_hash():
    a = LoraSpec.create(target_modules=["q_proj", "v_proj", "q_proj"])
    b = LoraSpec.create(target_modules=("v_proj", "q_proj"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != LoraSpec.create(target_modules=["q_proj", "v_proj"], r=8)
    assert a != LoraSpec.create(target_modules=r"(q|v)_proj")
    # pattern order matters (first match wins in PEFT), so it is part of the identity
    p1 = LoraSpec.create(rank_pattern={"q_proj": 8, "model.layers.1.self_attn.q_proj": 4})
    p2 = LoraSpec.create(rank_pattern={"model.layers.1.self_attn.q_proj": 4, "q_proj": 8})
    assert p1 != p2
    assert p1 == LoraSpec.create(rank_pattern={"q_proj": 8, "model.layers.1.self_attn.q_proj": 4})
    assert p1.rank_pattern == {"model.layers.1.self_attn.q_proj": 4, "q_proj": 8}  # vs a plain dict: dict equality
    with pytest.raises(Exception):
        a.r = 4
    with pytest.raises(AttributeError):
        FrozenDict({"a": 1}).x = 1


def test_loftq():
    spec = LoraSpec.create(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    assert spec.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    assert spec.to_peft_config_dict(None)["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    # PEFT drops a loftq_config given without init 'loftq', with a warning
    with pytest.warns(UserWarning, match="loftq_config"):
        spec = LoraSpec.create(loftq_config={"loftq_bits": 4})
    assert spec.loftq_config == {}
    with pytest.warns(UserWarning):
        assert LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}


BAD_ARGS = [
    # (kwargs, exception, substrings the message must contain)
    (dict(r=0), ValueError, ["r", "0"]),
    (dict(r=-4), ValueError, ["r", "-4"]),
    (dict(r=8.0), TypeError, ["r", "8.0"]),
    (dict(r=True), TypeError, ["r", "True", "bool"]),
    (dict(r="8"), TypeError, ["r", "'8'"]),
    (dict(lora_alpha=0), ValueError, ["lora_alpha", "0"]),
    (dict(lora_alpha=-1.5), ValueError, ["lora_alpha", "-1.5"]),
    (dict(lora_alpha=float("inf")), ValueError, ["lora_alpha", "inf"]),
    (dict(lora_alpha=True), TypeError, ["lora_alpha", "True"]),
    (dict(lora_alpha="16"), TypeError, ["lora_alpha", "'16'"]),
    (dict(lora_dropout=1.0), ValueError, ["lora_dropout", "1.0", "[0, 1)"]),
    (dict(lora_dropout=-0.1), ValueError, ["lora_dropout", "-0.1"]),
    (dict(lora_dropout=None), TypeError, ["lora_dropout", "None"]),
    (dict(lora_dropout=False), TypeError, ["lora_dropout", "False"]),
    (dict(bias="some"), ValueError, ["bias", "'some'", "lora_only"]),
    (dict(bias=None), ValueError, ["bias", "None", "'none'"]),
    (dict(use_rslora=1), TypeError, ["use_rslora", "1"]),
    (dict(use_dora="yes"), TypeError, ["use_dora", "'yes'"]),
    (dict(target_modules=None), ValueError, ["target_modules", "None", "all-linear"]),
    (dict(target_modules=[]), ValueError, ["target_modules", "[]"]),
    (dict(target_modules=""), ValueError, ["target_modules", "''"]),
    (dict(target_modules=["q_proj", ""]), ValueError, ["target_modules", "''"]),
    (dict(target_modules=["q_proj", 3]), TypeError, ["target_modules", "3"]),
    (dict(target_modules=42), TypeError, ["target_modules", "42"]),
    (dict(target_modules="(q_proj"), ValueError, ["target_modules", "'(q_proj'", "regular expression"]),
    (dict(exclude_modules="[bad"), ValueError, ["exclude_modules", "'[bad'"]),
    (dict(exclude_modules=[1]), TypeError, ["exclude_modules", "1"]),
    (dict(layers_to_transform="0"), TypeError, ["layers_to_transform", "'0'"]),
    (dict(layers_to_transform=[0, 1.0]), TypeError, ["layers_to_transform", "1.0"]),
    (dict(layers_to_transform=[True]), TypeError, ["layers_to_transform", "True"]),
    (dict(layers_to_transform=-1), ValueError, ["layers_to_transform", "-1"]),
    (dict(layers_to_transform=[0], layers_pattern=3), TypeError, ["layers_pattern", "3"]),
    (dict(layers_to_transform=[0], layers_pattern="(x"), ValueError, ["layers_pattern", "'(x'"]),
    (dict(layers_pattern="layers"), ValueError, ["layers_pattern", "'layers'", "layers_to_transform"]),
    (dict(layers_pattern=["layers"]), ValueError, ["layers_pattern", "layers_to_transform"]),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), ValueError, ["layers_to_transform", "[0]", "str"]),
    (dict(target_modules=".*q_proj", layers_to_transform=[0], layers_pattern="layers"), ValueError, ["layers_to_transform"]),
    (dict(target_modules="all-linear", layers_to_transform=0), ValueError, ["layers_to_transform", "all-linear"]),
    (dict(modules_to_save="lm_head"), TypeError, ["modules_to_save", "'lm_head'", "list"]),
    (dict(modules_to_save=["lm_head", None]), TypeError, ["modules_to_save", "None"]),
    (dict(modules_to_save=["lm_head("]), ValueError, ["modules_to_save", "'lm_head('"]),
    (dict(rank_pattern=[("q_proj", 4)]), TypeError, ["rank_pattern", "q_proj"]),
    (dict(rank_pattern={"q_proj": 0}), ValueError, ["rank_pattern['q_proj']", "0"]),
    (dict(rank_pattern={"q_proj": 2.0}), TypeError, ["rank_pattern['q_proj']", "2.0"]),
    (dict(rank_pattern={"(q": 2}), ValueError, ["rank_pattern", "'(q'"]),
    (dict(rank_pattern={3: 2}), TypeError, ["rank_pattern", "3"]),
    (dict(alpha_pattern={"q_proj": -1}), ValueError, ["alpha_pattern['q_proj']", "-1"]),
    (dict(alpha_pattern={"q_proj": "8"}), TypeError, ["alpha_pattern['q_proj']", "'8'"]),
    (dict(init_lora_weights="kaiming"), ValueError, ["init_lora_weights", "'kaiming'", "gaussian", "loftq"]),
    (dict(init_lora_weights=1), TypeError, ["init_lora_weights", "1"]),
    (dict(init_lora_weights=None), TypeError, ["init_lora_weights", "None"]),
    (dict(init_lora_weights="loftq"), ValueError, ["loftq_config", "init_lora_weights", "loftq"]),
    (dict(init_lora_weights="loftq", loftq_config={"bits": 4}), ValueError, ["loftq_config", "bits", "loftq_bits"]),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 3}), ValueError, ["loftq_bits", "3"]),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}), ValueError, ["loftq_iter", "0"]),
    (dict(loftq_config=[4]), TypeError, ["loftq_config", "[4]"]),
]


@pytest.mark.parametrize("kw,exc,needles", BAD_ARGS, ids=[repr(c[0])[:60] for c in BAD_ARGS])
def test_bad_arguments(kw, exc, needles):
    with pytest.raises(exc) as ei:
        LoraSpec.create(**kw)
    assert type(ei.value) is exc
    for needle in needles:
        assert needle in str(ei.value), (needle, str(ei.value))


@pytest.mark.parametrize("name", ["pissa", "pissa_niter_4", "olora", "eva", "corda", "orthogonal", "mica", "lora_ga"])
def test_peft_init_methods_not_implemented(name):
    with pytest.raises(NotImplementedError, match=f"init_lora_weights='{name}'"):
        LoraSpec.create(init_lora_weights=name)


def test_unknown_argument_is_type_error():
    with pytest.raises(TypeError, match="lora_rank"):
        LoraSpec.create(lora_rank=8)
    with pytest.raises(TypeError, match="random_state"):
        validate_lora_args(random_state=3407)


def test_resolve_targets_argument_errors():
    spec = LoraSpec.create()
    mods = module_list(make_model(2))
    with pytest.raises(ValueError, match="num_layers"):
        resolve_targets(spec, mods, 0)
    with pytest.raises(TypeError, match="num_layers"):
        resolve_targets(spec, mods, 2.0)
    with pytest.raises(ValueError, match="kind.*'conv'"):
        resolve_targets(spec, [("model.layers.0.self_attn.q_proj", "conv")], 1)
    with pytest.raises(TypeError, match="pairs"):
        resolve_targets(spec, ["model.layers.0.self_attn.q_proj"], 1)
    with pytest.raises(TypeError, match="LoraSpec"):
        resolve_targets({"r": 8}, mods, 2)


def test_warnings_like_peft():
    mods = module_list(make_model(2))
    with pytest.warns(UserWarning, match="no modules were excluded"):
        resolve_targets(LoraSpec.create(exclude_modules=["nothing"]), mods, 2)
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys.*\['zzz'\]"):
        resolve_targets(LoraSpec.create(rank_pattern={"zzz": 4}), mods, 2)


def test_module_imports_neither_torch_nor_peft():
    code = (
        "import sys, fastlora_jax.lora_config as m; "
        "assert not {'torch', 'peft', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "kw",
    [
        dict(target_modules=r".*mlp.*"),
        dict(target_modules=["self_attn", "mlp", "norm"], layers_to_transform=[1]),
        dict(target_modules=["layers.0", "embed_tokens"], exclude_modules=r".*self_attn"),
        dict(target_modules=["q_proj", "lm_head"], modules_to_save=["layers.1"], layers_to_transform=0),
    ],
)
def test_per_key_matching_matches_peft_function(kw):
    # Also covers keys of non-linear modules, which resolve_targets refuses as a whole.
    from peft.tuners.tuners_utils import check_target_module_exists as peft_check

    cfg = LoraConfig(**peft_kwargs(kw))
    spec = LoraSpec.create(**kw)
    for name, _ in module_list(make_model(3)):
        assert check_target_module_exists(spec, name) == bool(peft_check(cfg, name)), name
