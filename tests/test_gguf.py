"""GGUF export (issue 18) against transformers' GGUF reader, gguf.GGUFReader and (where installed) llama.cpp.

- Every text family end to end (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 text, Phi-3): a tiny random
  transformers checkpoint (family_cases.randomize_: biases, norms and every matrix redrawn) loaded in 4-bit by
  fastlora_jax, given LoRA (the family's default targets: Phi-3's fused qkv_proj / gate_up_proj), fine-tuned
  4 steps with SFTTrainer, exported with `save_pretrained_gguf` (f16, q8_0):
  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` gives the logits of the merged model that
  `save_pretrained_merged` writes (itself checked against PEFT in test_families.py), loaded in transformers.
  The fine-tuning is checked to be there: every LoRA B is non-zero, every targeted weight of the merged
  checkpoint differs from the base (the rest is equal), and the base's logits are far from the merged ones
  (a GGUF written from unmerged weights fails).
- The tiny configs keep what transformers' reader can carry: it has no key_length for qwen3 (it assumes
  head_dim 128) and Gemma's reader scales attention by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim = 256).
- Tensor names and metadata read back with GGUFReader equal llama.cpp's for a 2-layer model, and equal what
  gguf's own name map (the one llama.cpp's convert_hf_to_gguf.py uses) gives for the HF names.
- The adapter GGUF: llama.cpp's LoRA layout; base + alpha/r * B A equals the merged export, tensor by tensor.

Tolerances. f16: relative L2 of the logits < 1e-3 (f16 keeps 11 bits: 2^-11 ~ 5e-4 per weight). q8_0: each
block of 32 values is stored as round(x / d) * d with d = max|x| / 127, so the per-element error is uniform in
[-d/2, d/2] (RMS d/sqrt(12)). For each quantized tensor the expected relative RMS error is
eps_t = RMS(d) / (sqrt(12) * RMS(w)), computed here from the scales stored in the file; independent errors of the
T tensors on the path add in quadrature, so the logits' relative error is about sqrt(sum eps_t^2) (about 0.02 for
these models); the test allows 3x that. llama.cpp itself (llama-cpp-python, skipped when not installed): f32
files against the HF model within 2e-3 (its CPU kernels sum in a different order, and use f16 for some
intermediate products).
"""

import copy
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from conftest import rel_l2  # noqa: E402
from family_cases import FamilyCase, randomize_, write_family_checkpoint  # noqa: E402
from fastlora_jax import FastLanguageModel  # noqa: E402
from fastlora_jax.convert import gguf_export  # noqa: E402
from fastlora_jax.convert.gguf_export import write_gguf, write_lora_gguf  # noqa: E402
from fastlora_jax.tiny import write_tiny_tokenizer  # noqa: E402

IDS = [[1, 5, 17, 33, 80, 200, 7, 9, 311, 42, 12, 480]]
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (config class, model class, overrides, llama.cpp arch). Overrides keep what transformers' reader does
# not carry at the config defaults it assumes: Qwen3's head_dim (128: the reader has no key_length for qwen3)
# and Gemma's query_pre_attn_scalar (256 = head_dim, as llama.cpp scales by 1/sqrt(head_dim)).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(), "llama"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16), "llama"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1),
              "qwen3"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1),
               "gemma2"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1), "gemma3"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(), "phi3"),
}
LAYER = {  # llama.cpp's tensor names of one layer
    "llama": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"],
    "mistral": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"],
    "qwen2": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "attn_q.bias", "attn_k.bias", "attn_v.bias",
              "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"],
    "qwen3": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "attn_q_norm.weight", "attn_k_norm.weight",
              "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"],
    "gemma2": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "post_attention_norm.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
               "ffn_down.weight", "post_ffw_norm.weight"],
    "gemma3": ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight", "ffn_norm.weight",
               "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"],
    "phi3": ["attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
             "ffn_down.weight"],
}
TIED = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False, "gemma2": True, "gemma3": True,
        "phi3": False}
# what transformers' reader builds from each arch (it reads llama.cpp's "llama" arch, Mistral included, as Llama)
READER_CLASS = {"mistral": "LlamaForCausalLM"}
# llama.cpp's pre-tokenizer of the tiny byte-level BPE as each family loads it: transformers 5 gives a qwen2
# checkpoint its Qwen2Tokenizer, which splits with Qwen2's regex (single digits), llama.cpp's "qwen2"
PRE = {"qwen2": "qwen2"}


def expected_names(family: str) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{t}" for i in range(2) for t in LAYER[family]}
    return names if TIED[family] else names | {"output.weight"}


def family_case(family: str) -> FamilyCase:
    """The family's tiny case in family_cases.py's terms (its randomization, its checkpoint writer)."""
    config_name, model_name, overrides, _ = FAMILIES[family]
    return FamilyCase(f"gguf_{family}", family, config_name, model_name, {**TINY, **overrides})


def field(reader, key):
    return reader.fields[key].contents()


def logits_of(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def load_gguf(directory, filename):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename,
                                                                 dtype=torch.float32).eval()


def q8_0_tolerance(path) -> float:
    """3 * sqrt(sum_t eps_t^2), eps_t = RMS(d) / (sqrt(12) RMS(w)) from each Q8_0 tensor's stored block scales."""
    reader = gguf.GGUFReader(path)
    eps2 = 0.0
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        blocks = np.asarray(t.data).reshape(-1, 34)  # per block: f16 scale d, then 32 int8
        d = blocks[:, :2].copy().view(np.float16).astype(np.float64).ravel()
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        eps2 += (np.sqrt(np.mean(d ** 2)) / (np.sqrt(12) * np.sqrt(np.mean(w ** 2)))) ** 2
    assert eps2 > 0
    return 3 * float(np.sqrt(eps2))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def fine_tune_and_export(family: str, root):
    """The family's tiny checkpoint loaded in 4-bit, LoRA on the default targets, fine-tuned 4 steps with
    SFTTrainer, exported as merged HF (save_pretrained_merged) and GGUF f16 + q8_0 (save_pretrained_gguf)."""
    from fastlora_jax.data import bundled_dataset_path, load_records
    from fastlora_jax.trainer import SFTConfig, SFTTrainer

    base_dir = write_family_checkpoint(family_case(family), root / "base")
    model, tok = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=64, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                             random_state=0)
    args = SFTConfig(output_dir=str(root / "train"), per_device_train_batch_size=2, max_steps=4,
                     learning_rate=2e-2, logging_steps=2, save_strategy="no", disable_tqdm=True, seed=0)
    SFTTrainer(model=model, processing_class=tok, train_dataset=load_records(bundled_dataset_path())[:8],
               args=args).train()
    model.save_pretrained_merged(root / "merged", tok)
    out = root / "gguf"
    written = model.save_pretrained_gguf(out, tok, quantization_method=["f16", "q8_0"])
    merged = load_hf(root / "merged")
    return SimpleNamespace(family=family, model=model, tokenizer=tok, root=root, base_dir=base_dir, out=out,
                           written=written, merged=merged, merged_logits=logits_of(merged),
                           base_logits=logits_of(load_hf(base_dir)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(family): the family fine-tuned and exported (fine_tune_and_export), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = fine_tune_and_export(family, tmp_path_factory.mktemp(f"gguf-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def llama(exported):
    """The fine-tuned Llama, plus its adapter as a LoRA GGUF and the base and merged models as f32 GGUFs."""
    e = exported("llama")
    adapter = e.model.save_pretrained_gguf(e.root / "lora", e.tokenizer, quantization_method="f32",
                                           save_method="lora")
    hf_base = load_hf(e.base_dir)
    base_f32 = write_gguf(e.root / "base-gguf" / "base.F32.gguf", hf_base.config, hf_base.state_dict(),
                          e.tokenizer, quantization_method="f32")
    merged_f32 = write_gguf(e.root / "merged-gguf" / "merged.F32.gguf", e.merged.config, e.merged.state_dict(),
                            e.tokenizer, quantization_method="f32")
    return dict(model=e.model, tokenizer=e.tokenizer, root=e.root, out=e.out, written=e.written,
                adapter=adapter[0], base_f32=base_f32, merged_f32=merged_f32, model_dir=e.base_dir,
                merged_logits=e.merged_logits)


def random_family_model(family: str):
    """The family's tiny transformers model, randomized as family_cases.randomize_ does (biases, norms too)."""
    case = family_case(family)
    model = case.model_cls()(case.hf_config()).eval()
    randomize_(model, case.seed)
    return model


# ------------------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("method", ["f16", "q8_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fine_tuned_export_loads_in_transformers(exported, family, method):
    e = exported(family)
    name = gguf_export.gguf_filename(method)
    assert (e.out / name) in e.written
    loaded = load_gguf(e.out, name)
    assert type(loaded).__name__ == READER_CLASS.get(family, FAMILIES[family][1])
    ours = logits_of(loaded)
    tol = 1e-3 if method == "f16" else q8_0_tolerance(e.out / name)
    err = rel_l2(ours, e.merged_logits)
    assert err < tol, (family, method, err, tol)
    # and the fine-tuning is in there: the base model's logits are farther away
    assert rel_l2(e.base_logits, e.merged_logits) > 5 * err, (rel_l2(e.base_logits, e.merged_logits), err)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fine_tuning_changed_the_merged_weights(exported, family):
    """A merge that dropped B A would export the base and still match it: every LoRA B is non-zero after the
    steps, every targeted weight of the merged checkpoint differs from the base, every other tensor is equal."""
    e = exported(family)
    peft = {k: np.asarray(v) for k, v in e.model.peft_state_dict().items()}
    b_keys = [k for k in peft if "lora_B" in k]
    assert b_keys and all(np.abs(peft[k]).max() > 0 for k in b_keys), family
    targets = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight") + ".weight" for k in b_keys}
    base = load_hf(e.base_dir).state_dict()
    merged = e.merged.state_dict()
    assert set(merged) == set(base)
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    assert changed == targets, (sorted(changed ^ targets))


# ------------------------------------------------------------------------------------------ names, metadata


def _check_common(reader, family, arch, config, method):
    T = gguf.GGMLQuantizationType
    names = {t.name for t in reader.tensors}
    assert names == expected_names(family), (names ^ expected_names(family))
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.type") == "model"
    assert field(reader, "general.file_type") == int(getattr(gguf.LlamaFileType, f"MOSTLY_{method.upper()}"))
    assert field(reader, f"{arch}.block_count") == 2
    assert field(reader, f"{arch}.embedding_length") == config.hidden_size
    assert field(reader, f"{arch}.feed_forward_length") == config.intermediate_size
    assert field(reader, f"{arch}.attention.head_count") == config.num_attention_heads
    assert field(reader, f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, f"{arch}.context_length") == config.max_position_embeddings
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    for t in reader.tensors:  # 1-D tensors stay F32 (llama.cpp's rule); matrices take the method's type
        assert t.tensor_type == (T.F32 if len(t.shape) == 1 else getattr(T, method.upper())), t.name
    # the tokenizer as llama.cpp embeds a byte-level BPE
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == PRE.get(family, "gpt-2")
    assert len(field(reader, "tokenizer.ggml.tokens")) == config.vocab_size
    assert len(field(reader, "tokenizer.ggml.token_type")) == config.vocab_size
    assert len(field(reader, "tokenizer.ggml.merges")) > 100
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.padding_token_id")) == (1, 2, 0)
    assert "<|{{ message['role'] }}|>" in field(reader, "tokenizer.chat_template")


@pytest.mark.parametrize("method", ["f16", "q8_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_names_and_metadata(exported, family, method):
    e = exported(family)
    arch = FAMILIES[family][3]
    reader = gguf.GGUFReader(e.out / gguf_export.gguf_filename(method))
    c = e.model.config
    _check_common(reader, family, arch, c, method)
    # every HF tensor maps where gguf's own TensorNameMap (convert_hf_to_gguf.py's) maps it
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    for hf_name in e.merged.state_dict():
        if hf_name == "lm_head.weight" and TIED[family]:
            continue
        module, suffix = hf_name.rsplit(".", 1)
        assert gguf_export.arch_for(c.to_dict()).gguf_name(hf_name) == f"{name_map.get_name(module)}.{suffix}", \
            hf_name
    per_family = {
        "llama": {"llama.vocab_size": 512, "llama.rope.dimension_count": 16},
        "mistral": {"llama.vocab_size": 512, "llama.rope.dimension_count": 16, "llama.attention.key_length": 16},
        "qwen2": {},
        "qwen3": {"qwen3.attention.key_length": 128, "qwen3.attention.value_length": 128},
        "gemma2": {"gemma2.attn_logit_softcapping": getattr(c, "attn_logit_softcapping", None),
                   "gemma2.final_logit_softcapping": getattr(c, "final_logit_softcapping", None),
                   "gemma2.attention.sliding_window": getattr(c, "sliding_window", None),
                   "gemma2.attention.key_length": 256},
        "gemma3": {"gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4,
                   "gemma3.attention.sliding_window": getattr(c, "sliding_window", None),
                   "gemma3.attention.key_length": 256},
        "phi3": {"phi3.rope.scaling.original_context_length": getattr(c, "original_max_position_embeddings", None),
                 "phi3.rope.dimension_count": 16, "phi3.attention.sliding_window": 0},
    }[family]
    for key, value in per_family.items():
        assert field(reader, key) == pytest.approx(value), key


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_norms_are_stored_plus_one(exported, family):
    """llama.cpp stores Gemma's norm weights as w + 1; transformers' reader subtracts the 1 again."""
    e = exported(family)
    reader = gguf.GGUFReader(e.out / "model.F16.gguf")
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    hf = e.merged.state_dict()
    pairs = [("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
             ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
             ("output_norm.weight", "model.norm.weight")]
    if family == "gemma3":
        pairs.append(("blk.1.attn_k_norm.weight", "model.layers.1.self_attn.k_norm.weight"))
    for gguf_name, hf_name in pairs:
        np.testing.assert_allclose(stored[gguf_name], hf[hf_name].numpy() + 1, rtol=1e-6, err_msg=gguf_name)


def test_llama_biases_and_rope_permutation(tmp_path, tokenizer):
    """q/k weights and biases are in llama.cpp's rope row order: transformers' own reverse permutation gives HF's
    rows back. transformers' reader does not carry `attention_bias` into the config (its llama mapping has no
    such key, so it would build a bias-free Llama and drop the biases): it gets the HF config for the logits."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    config = transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(7)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    path = write_gguf(tmp_path / "model.F32.gguf", config, hf.state_dict(), tokenizer, quantization_method="f32")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_output.bias", "blk.1.ffn_down.bias"} <= set(stored)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for gguf_name, hf_name in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
                               ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
                               ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias")]:
        t = stored[gguf_name]
        w = np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])
        ref = hf.state_dict()[hf_name].numpy()
        assert not np.array_equal(w, ref)  # permuted
        np.testing.assert_array_equal(undo.process(w, gguf_name).weights, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                   config=config, dtype=torch.float32).eval()
    assert rel_l2(logits_of(loaded), logits_of(hf)) < 1e-6
    if _has_llama_cpp():
        assert rel_l2(_llama_cpp_logits(path), logits_of(hf)) < 2e-3


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tokenizer_rebuilt_by_transformers(exported, family):
    """transformers' reader rebuilds the embedded byte-level BPE, tokenizing as the tokenizer we were given. Not
    for the other archs: transformers picks its tokenizer converter by architecture, not by tokenizer.ggml.model
    (qwen3 -> Qwen2's split regex; gemma2/3, phi3 -> SentencePiece converters that need scores), where llama.cpp
    reads tokenizer.ggml.model / .pre (checked for every family in test_family_names_and_metadata)."""
    e = exported(family)
    tok = e.tokenizer
    rebuilt = transformers.AutoTokenizer.from_pretrained(str(e.out), gguf_file="model.F16.gguf")
    for text in ["Hello there! What is the capital of France?", "The quick brown fox, 42 times.\n  Indented.",
                 "In 1234 cases it's 3.14159."]:
        assert rebuilt(text)["input_ids"] == tok(text)["input_ids"], text
    assert rebuilt.chat_template == tok.chat_template
    assert rebuilt.convert_tokens_to_ids("</s>") == tok.eos_token_id == 2


def test_pre_tokenizer_named_by_its_split_regex(tmp_path, tokenizer):
    """A byte-level BPE of a vocabulary of its own (llama.cpp's hash table does not know it) that splits with
    Qwen2's or Llama 3's regex (as transformers spells them) gets llama.cpp's "qwen2" / "llama-bpe"."""
    import inspect
    from tokenizers import Regex, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    llama3 = inspect.signature(TikTokenConverter.__init__).parameters["pattern"].default
    model = random_family_model("qwen2")
    for regex, name in [(PRETOKENIZE_REGEX, "qwen2"), (llama3, "llama-bpe")]:
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer),
                                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        path = write_gguf(tmp_path / f"{name}.gguf", model.config, model.state_dict(), tok)
        assert field(gguf.GGUFReader(path), "tokenizer.ggml.pre") == name


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_gguf_layout_and_values(llama):
    model = llama["model"]
    reader = gguf.GGUFReader(llama["adapter"])
    assert llama["adapter"].name == "adapter.F32.gguf"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 16.0
    modules = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {f"blk.{i}.{m}.weight.lora_{ab}" for i in range(2) for m in modules for ab in "ab"}
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert set(tensors) == expected
    peft = {k: np.asarray(v) for k, v in model.peft_state_dict().items()}
    a = tensors["blk.0.ffn_down.weight.lora_a"]
    np.testing.assert_array_equal(a, peft["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"])
    assert a.shape == (8, 128) and tensors["blk.0.ffn_down.weight.lora_b"].shape == (64, 8)
    # llama.cpp applies W + alpha/r * B A: on the base GGUF that gives the merged GGUF, tensor by tensor
    base = {t.name: t for t in gguf.GGUFReader(llama["base_f32"]).tensors}
    merged = {t.name: t for t in gguf.GGUFReader(llama["merged_f32"]).tensors}
    scale = 16.0 / 8
    for i in range(2):
        for m in modules:
            name = f"blk.{i}.{m}.weight"
            w = np.asarray(base[name].data, np.float64)
            delta = tensors[name + ".lora_b"].astype(np.float64) @ tensors[name + ".lora_a"].astype(np.float64)
            np.testing.assert_allclose(w + scale * delta, np.asarray(merged[name].data), rtol=1e-5, atol=1e-6)


def test_lora_gguf_folds_rslora_into_b(tmp_path, rng):
    """llama.cpp scales by alpha / r: an rslora adapter (alpha / sqrt(r)) has the ratio folded into B."""
    config = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, intermediate_size=128, num_hidden_layers=1)
    a, b = rng.standard_normal((4, 64), np.float32), rng.standard_normal((32, 4), np.float32)
    path = write_lora_gguf(tmp_path / "a.gguf", config,
                           {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": a,
                            "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": b},
                           {"lora_alpha": 8, "use_rslora": True}, quantization_method="f32")
    t = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    alpha_over_r = field(gguf.GGUFReader(path), "adapter.lora.alpha") / 4
    np.testing.assert_allclose(alpha_over_r * t["blk.0.attn_k.weight.lora_b"], (8 / np.sqrt(4)) * b, rtol=1e-6)
    np.testing.assert_array_equal(t["blk.0.attn_k.weight.lora_a"], a)


def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(tmp_path):
    config = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, vocab_size=512,
                  intermediate_size=128, num_hidden_layers=1)
    with pytest.raises(ValueError, match="DoRA"):
        write_lora_gguf(tmp_path / "a.gguf", config, {}, {"lora_alpha": 8, "use_dora": True})
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.norm\.weight' has no llama\.cpp LoRA form"):
        write_lora_gguf(tmp_path / "a.gguf", config, {"base_model.model.model.norm.weight": np.ones(64)},
                        {"lora_alpha": 8})


# ------------------------------------------------------------------------------------------ Modelfile, errors


def test_ollama_modelfile(llama):
    text = (llama["out"] / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.F16.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n"""' in text
    assert 'PARAMETER stop "</s>"' in lines


def test_modelfile_notes_an_untranslated_template(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text = gguf_export.write_modelfile(tmp_path, "m.gguf", tok).read_text()
    assert "TEMPLATE" not in text.replace("# The chat template", "")
    assert "#   {% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}" in text
    assert "tokenizer.chat_template" in text


def test_bad_arguments(llama, tmp_path, monkeypatch):
    model, tok = llama["model"], llama["tokenizer"]
    with pytest.raises(ValueError, match=r"quantization_method='q9_0' is not accepted; written here: "
                                         r"\['bf16', 'f16', 'f32', 'q8_0'\]"):
        model.save_pretrained_gguf(tmp_path, tok, quantization_method="q9_0")
    with pytest.raises(ValueError, match="save_method='merged_4bit' is not accepted"):
        model.save_pretrained_gguf(tmp_path, tok, save_method="merged_4bit")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(ImportError, match=r"'q4_k_m' needs llama\.cpp's quantizer: pip install llama-cpp-python"):
        model.save_pretrained_gguf(tmp_path, tok, quantization_method="q4_k_m")
    with pytest.raises(ValueError, match=r"architecture \['Qwen2VLForConditionalGeneration'\] is not supported; "
                                         r"supported: \['Gemma2ForCausalLM'"):
        write_gguf(tmp_path / "x.gguf", {"architectures": ["Qwen2VLForConditionalGeneration"]}, {})


def test_failed_export_keeps_the_previous_file(tmp_path, tokenizer):
    model = random_family_model("qwen2")
    path = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tokenizer)
    before = path.read_bytes()
    state = model.state_dict()

    def broken():
        for i, (name, value) in enumerate(state.items()):
            if i == 5:
                raise OSError("disk full")
            yield name, value

    with pytest.raises(OSError, match="disk full"):
        write_gguf(path, model.config, broken(), tokenizer, shapes={n: tuple(v.shape) for n, v in state.items()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


# ------------------------------------------------------------------------------------------ llama.cpp itself


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _llama_cpp_logits(path, lora=None) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (compiles llama.cpp) not installed")
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, seed=0,
                          **kwargs)
    try:
        llm.eval(IDS[0])
        return np.array(llm.scores[: len(IDS[0])])[None]
    finally:
        llm.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_the_export(exported, tmp_path, family):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (compiles llama.cpp) not installed")
    e = exported(family)
    (path,) = e.model.save_pretrained_gguf(tmp_path, e.tokenizer, quantization_method="f32")
    assert rel_l2(_llama_cpp_logits(path), e.merged_logits) < 2e-3


def test_llama_cpp_applies_the_lora_gguf(llama):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (compiles llama.cpp) not installed")
    merged = llama["merged_logits"]
    assert rel_l2(_llama_cpp_logits(llama["merged_f32"]), merged) < 2e-3
    assert rel_l2(_llama_cpp_logits(llama["base_f32"], lora=llama["adapter"]), merged) < 2e-3


def test_k_quant_through_llama_cpp(llama):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (compiles llama.cpp) not installed")
    out = llama["root"] / "q4"
    (path,) = llama["model"].save_pretrained_gguf(out, llama["tokenizer"], quantization_method="q4_k_m")
    assert path.name == "model.Q4_K_M.gguf"
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    types = {t.tensor_type for t in reader.tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types or gguf.GGMLQuantizationType.Q5_0 in types, types
    merged = llama["merged_logits"]
    assert rel_l2(_llama_cpp_logits(path), merged) < 0.2  # 4-bit: a sanity bound, not a parity check


def test_cli_export_gguf(llama, tmp_path):
    from fastlora_jax import cli
    out = tmp_path / "cli-gguf"
    assert cli.main(["export", "--adapter", str(llama["root"] / "train"), "--output", str(out), "--merged",
                     "--gguf", "q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.Q8_0.gguf"]
    merged = llama["merged_logits"]
    ours = logits_of(load_gguf(out, "model.Q8_0.gguf"))
    assert rel_l2(ours, merged) < q8_0_tolerance(out / "model.Q8_0.gguf")


def test_sentencepiece_style_tokenizer_as_llama_model(tmp_path):
    """A BPE with byte fallback (how transformers holds Llama-2 / Gemma / Phi-3 SentencePiece vocabularies) goes
    in as llama.cpp's "llama" tokenizer model, through gguf's own LlamaHfVocab as convert_hf_to_gguf.py does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from fastlora_jax.tiny import _corpus
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                   show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    model = random_family_model("gemma2")
    path = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), fast, quantization_method="f16")
    reader = gguf.GGUFReader(path)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.pre") == "default"
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == len(field(reader, "tokenizer.ggml.scores")) == 512
    T = gguf.TokenType
    assert tokens[3 + 0x41] == "<0x41>" and types[3 + 0x41] == T.BYTE
    assert types[1] == types[2] == T.CONTROL and tokens[-1] == "[PAD511]" and types[-1] == T.UNUSED
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
