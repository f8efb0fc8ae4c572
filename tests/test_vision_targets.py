"""fastlora_jax.lora_config.vision_target_modules: FastVisionModel's finetune_* selection, PEFT as the oracle.

Tiny random Qwen2-VL / Qwen2.5-VL / Llama models are built with transformers; the module list is taken
from torch `named_modules()`. For every combination of the four flags, the modules PEFT wraps with our
regex must equal the selection the test computes from the rule with its own predicates (written against
these models' known layouts, not with the library's tag tests).
"""

import itertools
import json
import re
import warnings
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from fastlora_jax.lora_config import LoraSpec, resolve_targets, vision_target_modules  # noqa: E402

VISION_DEPTH = {"qwen2_vl": 2, "qwen2_5_vl": 4}
TEXT_LAYERS = 2
FLAG_NAMES = ("finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules", "finetune_mlp_modules")
ALL_FLAGS = list(itertools.product((True, False), repeat=4))


def _text_config():
    return dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def make_model(family):
    torch.manual_seed(0)
    if family == "qwen2_vl":
        vision = dict(
            depth=VISION_DEPTH[family], embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
            patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
        )
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=_text_config(), vision_config=vision))
    if family == "qwen2_5_vl":
        vision = dict(
            depth=VISION_DEPTH[family], hidden_size=32, out_hidden_size=32, num_heads=4, intermediate_size=64,
            patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
            fullatt_block_indexes=[1, 3], in_channels=3,
        )
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=_text_config(), vision_config=vision))
    if family == "llama":
        cfg = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128,
        )
        return LlamaForCausalLM(cfg)
    raise AssertionError(family)


def module_list(model):
    def kind(m):
        if isinstance(m, torch.nn.Linear):
            return "linear"
        if isinstance(m, torch.nn.Embedding):
            return "embedding"
        return "other"

    return [(name, kind(m)) for name, m in model.named_modules() if name]


@pytest.fixture(scope="module")
def lists():
    """family -> module list (the models themselves are rebuilt per PEFT run: PEFT mutates them)."""
    return {f: module_list(make_model(f)) for f in ("qwen2_vl", "qwen2_5_vl", "llama")}


def peft_selected(family, target_modules):
    model = make_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=target_modules))
    base = pm.base_model.model
    return [name for name, m in base.named_modules() if isinstance(m, LoraLayer)]


def ours_selected(ml, regex):
    spec = LoraSpec.create(target_modules=regex)
    return [t.name for t in resolve_targets(spec, ml, TEXT_LAYERS)]


# The rule, spelled with this test's own predicates on the known layouts.
def in_vision(name):
    return name.startswith("model.visual.")


def in_language(name):
    return name.startswith("model.language_model.") or re.match(r"model\.layers\.\d+\.", name) is not None


def is_attention(name):
    return name.rsplit(".", 1)[0].endswith((".attn", ".self_attn"))


def is_mlp(name):
    return name.rsplit(".", 1)[0].endswith(".mlp")


def expected_selection(ml, flags, names=None):
    vision, language, attention, mlp = flags
    if names is None:  # None / "all-linear": linear modules whose leaf name is repeated
        linear = [n for n, k in ml if k == "linear"]
        leaf_count = Counter(n.split(".")[-1] for n in linear)
        candidates = [n for n in linear if leaf_count[n.split(".")[-1]] >= 2]
    else:
        candidates = [n for n, _ in ml if any(n == e or n.endswith("." + e) for e in names)]
    return [
        n for n in candidates
        if ((vision and in_vision(n)) or (language and in_language(n)))
        and ((attention and is_attention(n)) or (mlp and is_mlp(n)))
    ]


def flag_kwargs(flags):
    return dict(zip(FLAG_NAMES, flags))


@pytest.mark.parametrize("flags", ALL_FLAGS, ids=lambda f: "".join("VLAM"[i] if v else "-" for i, v in enumerate(f)))
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_every_flag_combination_matches_peft(lists, family, flags):
    ml = lists[family]
    vision, language, attention, mlp = flags
    if not (vision or language) or not (attention or mlp):
        missing = []
        if not (vision or language):
            missing += ["finetune_vision_layers", "finetune_language_layers"]
        if not (attention or mlp):
            missing += ["finetune_attention_modules", "finetune_mlp_modules"]
        with pytest.raises(ValueError) as err:
            vision_target_modules(ml, **flag_kwargs(flags))
        for arg in missing:
            assert f"{arg}=False" in str(err.value)
        return
    expected = expected_selection(ml, flags)
    assert expected  # every valid combination selects something on these models
    regex = vision_target_modules(ml, **flag_kwargs(flags))
    assert isinstance(regex, str)
    assert [n for n, _ in ml if re.fullmatch(regex, n)] == expected
    assert peft_selected(family, regex) == expected
    assert ours_selected(ml, regex) == expected
    # "all-linear" (any case) is the same as None.
    assert vision_target_modules(ml, "all-linear", **flag_kwargs(flags)) == regex
    assert vision_target_modules(ml, "ALL-Linear", **flag_kwargs(flags)) == regex


def test_qwen2_5_vl_all_flags_selection(lists):
    ml = lists["qwen2_5_vl"]
    regex = vision_target_modules(ml)
    got = peft_selected("qwen2_5_vl", regex)
    want = set()
    for i in range(VISION_DEPTH["qwen2_5_vl"]):
        want |= {f"model.visual.blocks.{i}.attn.{p}" for p in ("qkv", "proj")}
        want |= {f"model.visual.blocks.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    for i in range(TEXT_LAYERS):
        want |= {f"model.language_model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        want |= {f"model.language_model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(got) == want and len(got) == len(want)
    for name in ("lm_head", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "model.visual.patch_embed.proj",
                 "model.language_model.embed_tokens"):
        assert name in dict(ml)
        assert name not in got
    # Readable: layer indices are generalised, not listed.
    assert r"\d+" in regex and "blocks.0" not in regex


def test_qwen2_vl_vision_mlp_is_fc1_fc2(lists):
    ml = lists["qwen2_vl"]
    regex = vision_target_modules(ml, finetune_language_layers=False, finetune_attention_modules=False)
    got = peft_selected("qwen2_vl", regex)
    assert got == [f"model.visual.blocks.{i}.mlp.{p}" for i in range(VISION_DEPTH["qwen2_vl"]) for p in ("fc1", "fc2")]


def test_regex_recorded_in_adapter_config(lists, tmp_path):
    ml = lists["qwen2_5_vl"]
    regex = vision_target_modules(ml, finetune_vision_layers=False)
    model = make_model("qwen2_5_vl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=regex, task_type="CAUSAL_LM"))
        pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == regex
    ours = LoraSpec.create(target_modules=regex).to_peft_config_dict(None, modules=ml)
    assert ours["target_modules"] == regex


@pytest.mark.parametrize(
    "names, flags",
    [
        (["q_proj", "qkv", "fc1"], (True, False, True, True)),
        (["q_proj", "qkv", "fc1"], (False, True, True, True)),
        (["q_proj", "qkv", "fc1"], (True, True, False, True)),
        (["q_proj", "o_proj", "proj", "fc2", "down_proj", "lm_head", "embed_tokens"], (True, True, True, True)),
        (["model.visual.blocks.1.attn.qkv", "o_proj", "mlp.0"], (True, True, True, True)),
        (("gate_proj", "up_proj"), (False, True, False, True)),
    ],
)
def test_list_narrowed_by_flags(lists, names, flags):
    ml = lists["qwen2_vl"]
    expected = expected_selection(ml, flags, names)
    assert expected
    regex = vision_target_modules(ml, names, **flag_kwargs(flags))
    assert isinstance(regex, str)
    assert peft_selected("qwen2_vl", regex) == expected
    assert ours_selected(ml, regex) == expected


def test_list_subset_of_layers_spelled_out(lists):
    ml = lists["qwen2_vl"]
    regex = vision_target_modules(ml, ["model.visual.blocks.1.attn.qkv", "model.language_model.layers.0.self_attn.q_proj"])
    assert peft_selected("qwen2_vl", regex) == [
        "model.visual.blocks.1.attn.qkv", "model.language_model.layers.0.self_attn.q_proj",
    ]


def test_list_selecting_nothing_raises(lists):
    ml = lists["qwen2_vl"]
    with pytest.raises(ValueError, match="No module selected"):
        vision_target_modules(ml, ["lm_head", "embed_tokens"])
    with pytest.raises(ValueError, match="No module selected"):
        vision_target_modules(ml, ["qkv", "fc1"], finetune_vision_layers=False)
    with pytest.raises(ValueError, match="No module selected"):
        vision_target_modules(ml, ["no_such_module"])


def test_regex_string_used_as_given(lists):
    ml = lists["qwen2_5_vl"]
    rx = r".*\.visual\.blocks\.[02]\.attn\.qkv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vision_target_modules(ml, rx) == rx
    with pytest.warns(UserWarning, match="finetune_vision_layers=False"):
        assert vision_target_modules(ml, rx, finetune_vision_layers=False) == rx
    # Flags are not applied to a regex, not even the "nothing selected" check.
    with pytest.warns(UserWarning):
        assert vision_target_modules(ml, rx, finetune_attention_modules=False, finetune_mlp_modules=False) == rx
    assert peft_selected("qwen2_5_vl", rx) == ["model.visual.blocks.0.attn.qkv", "model.visual.blocks.2.attn.qkv"]
    with pytest.raises(ValueError, match="full-matches no module"):
        vision_target_modules(ml, "q_proj")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        vision_target_modules(ml, "model.(")
    with pytest.raises(ValueError, match="target_modules=''"):
        vision_target_modules(ml, "")


def test_text_only_llama(lists):
    ml = lists["llama"]
    for flags in [(False, True, True, True), (True, True, True, True), (False, True, True, False), (False, True, False, True)]:
        expected = expected_selection(ml, flags)
        assert expected and all(n.startswith("model.layers.") for n in expected)
        regex = vision_target_modules(ml, **flag_kwargs(flags))
        assert peft_selected("llama", regex) == expected
        assert ours_selected(ml, regex) == expected
    assert len(expected_selection(ml, (False, True, True, True))) == 7 * TEXT_LAYERS
    with pytest.raises(ValueError, match="0 are in the vision tower"):
        vision_target_modules(ml, finetune_language_layers=False)


def test_leaf_name_never_decides_component():
    """An attention output named `dense` (phi) is attention only: the MLP tag `dense` is not read from the leaf."""
    ml = []
    for i in range(2):
        p = f"model.layers.{i}"
        ml += [(p, "other"), (f"{p}.self_attn", "other")]
        ml += [(f"{p}.self_attn.{n}", "linear") for n in ("q_proj", "k_proj", "v_proj", "dense")]
        ml += [(f"{p}.mlp", "other"), (f"{p}.mlp.fc1", "linear"), (f"{p}.mlp.fc2", "linear")]
        ml += [(f"{p}.o_proj_text", "linear")]  # under neither component
    ml += [("lm_head", "linear")]
    names = [n for n, _ in ml]
    mlp_only = vision_target_modules(ml, finetune_attention_modules=False)
    assert [n for n in names if re.fullmatch(mlp_only, n)] == [
        f"model.layers.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)
    ]
    attn_only = vision_target_modules(ml, finetune_mlp_modules=False)
    assert [n for n in names if re.fullmatch(attn_only, n)] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "dense")
    ]


def test_argument_errors(lists):
    ml = lists["qwen2_vl"]
    with pytest.raises(ValueError, match="finetune_vision_layers=False and finetune_language_layers=False"):
        vision_target_modules(ml, finetune_vision_layers=False, finetune_language_layers=False)
    with pytest.raises(ValueError, match="finetune_attention_modules=False and finetune_mlp_modules=False"):
        vision_target_modules(ml, ["q_proj"], finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(TypeError, match="finetune_mlp_modules"):
        vision_target_modules(ml, finetune_mlp_modules=1)
    with pytest.raises(TypeError, match="finetune_vision_layers"):
        vision_target_modules(ml, finetune_vision_layers=None)
    with pytest.raises(ValueError, match="target_modules must not be empty"):
        vision_target_modules(ml, [])
    with pytest.raises(TypeError, match="target_modules"):
        vision_target_modules(ml, 3)
    with pytest.raises(TypeError, match="modules"):
        vision_target_modules([("a.b", "linear", 1)])
    with pytest.raises(ValueError, match="kind"):
        vision_target_modules([("a.b", "conv")])
