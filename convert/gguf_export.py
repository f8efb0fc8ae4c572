"""GGUF export for llama.cpp / Ollama: a merged model as one `.gguf` file, or a LoRA adapter as a GGUF LoRA.

Written with `gguf` (llama.cpp's own Python package: `GGUFWriter`, `gguf.quants`, `SpecialVocab`, `LlamaHfVocab`),
with llama.cpp's conventions as its `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` write them. What differs
between architectures is data, the `ARCHS` table: llama.cpp's arch name, a regex table from HF tensor names to
GGUF names, HF config fields -> GGUF metadata keys, and the per-arch transforms llama.cpp applies:
- Llama / Mistral: q_proj / k_proj rows permuted to llama.cpp's rope layout (`permute_qk`; transformers' GGUF
  reader undoes it with `LlamaTensorProcessor._reverse_permute_weights`);
- Gemma 2 / 3: every `*norm.weight` stored as w + 1 (HF's Gemma RMSNorm multiplies by 1 + w; llama.cpp by w);
- Phi-3: fused `qkv_proj` / `gate_up_proj` stay fused (`attn_qkv`, `ffn_up`), as llama.cpp reads them.

Everything works from an HF-named state dict + HF config + tokenizer, so any family's transformers checkpoint
can be exported; `CausalLM.save_pretrained_gguf` feeds it the merged weights. Tensors stream: the header is
written from the shapes, then one tensor at a time is read, transformed, converted and written, into a
temporary file that is renamed at the end (a failed export leaves the previous file intact).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

# quantization_method -> (GGML tensor type of 2-D weights, llama.cpp file type name). Unsloth's aliases included.
FLOAT_METHODS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "float16": "f16",
           "bfloat16": "bf16", "float32": "f32"}
# Types only llama.cpp's C++ quantizer makes (gguf.quants has no K-quant *quantizer*): through llama-cpp-python.
LLAMA_CPP_METHODS = {"q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
                     "q5_k_s": "MOSTLY_Q5_K_S", "q6_k": "MOSTLY_Q6_K", "q3_k_m": "MOSTLY_Q3_K_M",
                     "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_l": "MOSTLY_Q3_K_L", "q2_k": "MOSTLY_Q2_K",
                     "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
LLAMA_CPP_HINT = ("pip install llama-cpp-python (an sdist: it compiles llama.cpp with cmake and a C++ compiler, "
                  "about 10-20 minutes on 2 cores, too slow for CI here)")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'fastlora-jax[gguf]'") from None
    return gguf


# ------------------------------------------------------------------------------------------ the table

# (HF regex, GGUF name) shared by the Llama-like families; `\1` is the layer index, `\2` weight|bias.
_L = r"model\.layers\.(\d+)\."
_COMMON = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (_L + r"input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (_L + r"self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (_L + r"self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (_L + r"self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (_L + r"self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (_L + r"mlp\.gate_proj\.(weight|bias)", r"blk.\1.ffn_gate.\2"),
    (_L + r"mlp\.up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (_L + r"mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
)
_POST_ATTN_IS_FFN_NORM = ((_L + r"post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),)
_QK_NORM = ((_L + r"self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
            (_L + r"self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"))
_GEMMA_NORMS = ((_L + r"post_attention_layernorm\.weight", r"blk.\1.post_attention_norm.weight"),
                (_L + r"pre_feedforward_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
                (_L + r"post_feedforward_layernorm\.weight", r"blk.\1.post_ffw_norm.weight"))
_PHI3_FUSED = ((_L + r"self_attn\.qkv_proj\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
               (_L + r"mlp\.gate_up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"))


def _rope(c: dict, kind: str = "full_attention") -> dict:
    """The rope parameters of full (or sliding) attention layers, from transformers 5's `rope_parameters`."""
    rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if kind in rp or "full_attention" in rp:
        return dict(rp.get(kind) or {})
    if kind == "sliding_attention":
        return {"rope_theta": c["rope_local_base_freq"]} if c.get("rope_local_base_freq") else {}
    if "rope_theta" not in rp and c.get("rope_theta") is not None:
        rp["rope_theta"] = c["rope_theta"]
    return rp


def _head_dim(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _common_meta(c: dict) -> dict:
    """What llama.cpp's TextModel.set_gguf_parameters writes for every text model."""
    meta = {"context_length": c.get("max_position_embeddings"), "embedding_length": c["hidden_size"],
            "feed_forward_length": c["intermediate_size"], "block_count": c["num_hidden_layers"],
            "attention.head_count": c["num_attention_heads"],
            "attention.head_count_kv": c.get("num_key_value_heads") or c["num_attention_heads"],
            "rope.freq_base": _rope(c).get("rope_theta"),
            "attention.layer_norm_rms_epsilon": c.get("rms_norm_eps")}
    if c.get("head_dim") is not None:
        meta["attention.key_length"] = meta["attention.value_length"] = c["head_dim"]
    rope = _rope(c)
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(factor)})
    elif kind == "yarn" and factor is not None:
        meta.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(factor),
                     "rope.scaling.original_context_length": rope["original_max_position_embeddings"]})
    elif kind not in (None, "default", "llama3"):
        raise ValueError(f"rope_parameters rope_type={kind!r} has no GGUF export here; accepted: default, linear, "
                         f"yarn, llama3")
    return meta


def _llama_meta(c: dict) -> dict:
    return {**_common_meta(c), "vocab_size": c["vocab_size"], "rope.dimension_count": _head_dim(c)}


def _gemma2_meta(c: dict) -> dict:
    return {**_common_meta(c), "attention.key_length": _head_dim(c), "attention.value_length": _head_dim(c),
            "attn_logit_softcapping": c.get("attn_logit_softcapping"),
            "final_logit_softcapping": c.get("final_logit_softcapping"),
            "attention.sliding_window": c.get("sliding_window")}


def _gemma3_meta(c: dict) -> dict:
    return {**_common_meta(c), "attention.key_length": _head_dim(c), "attention.value_length": _head_dim(c),
            "rope.freq_base": _rope(c).get("rope_theta", 1_000_000.0),
            "rope.freq_base_swa": _rope(c, "sliding_attention").get("rope_theta"),
            "final_logit_softcapping": c.get("final_logit_softcapping") or None,
            "attention.sliding_window": c.get("sliding_window")}


def _phi3_meta(c: dict) -> dict:
    rope = _rope(c)
    rot = rope.get("partial_rotary_factor", c.get("partial_rotary_factor") or 1.0)
    if rope.get("long_factor"):
        raise ValueError("Phi-3 longrope (rope_parameters long_factor/short_factor) has no GGUF export here")
    return {**_common_meta(c),
            "rope.scaling.original_context_length": c.get("original_max_position_embeddings")
            or c.get("max_position_embeddings"),
            "rope.dimension_count": int(rot * c["hidden_size"]) // c["num_attention_heads"],
            "attention.sliding_window": c.get("sliding_window") or 0}


def _llama3_rope_freqs(c: dict) -> dict[str, np.ndarray]:
    """`rope_freqs.weight`: llama.cpp's per-frequency factors for Llama-3.x rope scaling."""
    rope = _rope(c)
    if rope.get("rope_type") != "llama3":
        return {}
    base, dim = rope.get("rope_theta", 10000.0), _head_dim(c)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(out, np.float32)}


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture: names, metadata and the transforms between HF's tensors and llama.cpp's."""
    name: str                                   # llama.cpp's general.architecture
    tensors: tuple[tuple[str, str], ...]        # (HF full-name regex, GGUF name template)
    metadata: Callable[[dict], dict]            # HF config dict -> {GGUF key without the arch prefix: value}
    permute_qk: bool = False                    # llama.cpp's rope row order for q_proj / k_proj
    norm_offset: float = 0.0                    # added to every `*norm.weight` (Gemma: 1)
    extra_tensors: Callable[[dict], dict] = field(default=lambda c: {})
    # Tokens that end a turn, for Ollama's PARAMETER stop (besides the tokenizer's eos).
    stop_tokens: tuple[str, ...] = ()

    def gguf_name(self, hf_name: str) -> str | None:
        for pattern, template in self.tensors:
            if re.fullmatch(pattern, hf_name):
                return re.sub(pattern, template, hf_name)
        return None


_LLAMA = Arch("llama", _COMMON + _POST_ATTN_IS_FFN_NORM, _llama_meta, permute_qk=True,
              extra_tensors=_llama3_rope_freqs, stop_tokens=("<|eot_id|>", "<|eom_id|>"))
ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": _LLAMA,
    # llama.cpp converts Mistral as arch "llama" (convert_hf_to_gguf's LlamaModel), permutation included.
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": Arch("qwen2", _COMMON + _POST_ATTN_IS_FFN_NORM, _common_meta, stop_tokens=("<|im_end|>",)),
    "Qwen3ForCausalLM": Arch("qwen3", _COMMON + _POST_ATTN_IS_FFN_NORM + _QK_NORM, _common_meta,
                             stop_tokens=("<|im_end|>",)),
    "Gemma2ForCausalLM": Arch("gemma2", _COMMON + _GEMMA_NORMS, _gemma2_meta, norm_offset=1.0,
                              stop_tokens=("<end_of_turn>",)),
    "Gemma3ForCausalLM": Arch("gemma3", _COMMON + _GEMMA_NORMS + _QK_NORM, _gemma3_meta, norm_offset=1.0,
                              stop_tokens=("<end_of_turn>",)),
    "Phi3ForCausalLM": Arch("phi3", _COMMON + _POST_ATTN_IS_FFN_NORM + _PHI3_FUSED, _phi3_meta,
                            stop_tokens=("<|end|>", "<|endoftext|>")),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "phi3": "Phi3ForCausalLM"}


def config_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a transformers PretrainedConfig or a dict; got {type(config).__name__}")


def arch_for(config: dict) -> Arch:
    """The table entry of an HF config; a clear error naming what is supported otherwise."""
    archs = list(config.get("architectures") or [])
    for a in archs:
        if a in ARCHS:
            return ARCHS[a]
    if not archs and config.get("model_type") in MODEL_TYPES:
        return ARCHS[MODEL_TYPES[config["model_type"]]]
    raise ValueError(f"GGUF export: architecture {archs or config.get('model_type')!r} is not supported; "
                     f"supported: {sorted(ARCHS)}")


def permute_rows(w, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (HF's half-split rope rows -> interleaved pairs), rows of a weight,
    bias or LoRA B."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _transform(arch: Arch, c: dict, hf_name: str, x: np.ndarray) -> np.ndarray:
    if arch.permute_qk and re.search(r"\.self_attn\.[qk]_proj\.(weight|bias)$", hf_name):
        kv = c.get("num_key_value_heads") or c["num_attention_heads"]
        x = permute_rows(x, c["num_attention_heads"], c["num_attention_heads"] if ".q_proj." in hf_name else kv)
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        x = x + np.float32(arch.norm_offset)
    return x


def as_float32(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x).astype(np.float32)


# ------------------------------------------------------------------------------------------ tensor types


def resolve_method(quantization_method: str) -> str:
    """The canonical name ('f16', 'q8_0', 'q4_k_m', ...) of a quantization_method, or a clear error."""
    if not isinstance(quantization_method, str):
        raise TypeError(f"quantization_method must be a string; got {quantization_method!r}")
    m = ALIASES.get(quantization_method.lower(), quantization_method.lower())
    if m not in FLOAT_METHODS and m not in LLAMA_CPP_METHODS:
        raise ValueError(f"quantization_method={quantization_method!r} is not accepted; written here: "
                         f"{sorted(FLOAT_METHODS)}; through llama.cpp's quantizer (llama-cpp-python): "
                         f"{sorted(LLAMA_CPP_METHODS)}; aliases: {ALIASES}")
    return m


def tensor_type(method: str, shape: tuple[int, ...]):
    """The GGML type llama.cpp's converter gives a tensor: 1-D (norms, biases, rope factors) stay F32; 2-D
    weights take the method's type; a Q8_0 row that is not a multiple of its 32-value block falls back to F16."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if len(shape) <= 1:
        return T.F32
    qtype = getattr(T, FLOAT_METHODS[method])
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return T.F16
    return qtype


def _encode(x_f32: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(x_f32, np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(x_f32.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(x_f32), qtype)  # BF16, Q8_0: uint8 bytes


def _file_type(method: str) -> int:
    gguf = _gguf()
    return int(getattr(gguf.LlamaFileType, "ALL_F32" if method == "f32" else f"MOSTLY_{FLOAT_METHODS[method]}"))


# ------------------------------------------------------------------------------------------ tokenizer

# llama.cpp's `get_vocab_base_pre`: sha256 of the token ids of its check text -> pre-tokenizer name. The entries
# of the families covered here (the full table is in convert_hf_to_gguf.py).
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}


# Where the hash is unknown (a vocabulary of its own), a byte-level BPE whose pre-tokenizer is Split(regex) then
# ByteLevel(use_regex=False) is named by its regex: these are the splits of llama.cpp's pre-tokenizer types (its
# llama-vocab.cpp spells the case-insensitive contractions out as '[sS]|'[tT]|...), as transformers writes them
# (Qwen2Tokenizer's PRETOKENIZE_REGEX; Llama 3's tokenizer.json, which groups digits by up to three).
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_PUNCT_SPACE = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {_WORDS + r"\p{N}" + _PUNCT_SPACE: "qwen2", _WORDS + r"\p{N}{1,3}" + _PUNCT_SPACE: "llama-bpe"}


def _split_regex(pre: dict) -> str | None:
    """The regex of a Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False)] pre-tokenizer, else None."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True):
        return None
    return (split.get("pattern") or {}).get("Regex")


def _pre_tokenizer(tokenizer, tokenizer_json: dict) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # a plain byte-level BPE splits with GPT-2's regex, as llama.cpp's "gpt-2"
    if _split_regex(pre) in SPLIT_REGEXES:
        return SPLIT_REGEXES[_split_regex(pre)]
    warnings.warn("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp names; writing "
                  "tokenizer.ggml.pre='default' (llama.cpp may split text differently)", stacklevel=4)
    return "default"


def _looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special`."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def add_tokenizer(writer, tokenizer, vocab_size: int) -> dict:
    """Embed the tokenizer as llama.cpp's converter does: byte-level BPE as tokenizer.ggml.model "gpt2" (tokens,
    token_type, merges, pre), a SentencePiece-style BPE (byte fallback) as "llama" (tokens, scores, token_type);
    bos/eos/unk/pad ids, add_bos/add_eos and tokenizer.chat_template. Returns {"model", "pre", "tokens"}."""
    gguf = _gguf()
    with tempfile.TemporaryDirectory(prefix="fastlora-gguf-tok-") as tmp:
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        tj_path = path / "tokenizer.json"
        if not tj_path.is_file():
            raise ValueError("GGUF export needs a fast tokenizer (tokenizer.json); got "
                             f"{type(tokenizer).__name__} without one")
        tj = json.loads(tj_path.read_text())
        model_type = tj["model"]["type"]
        TT = gguf.TokenType
        if model_type == "BPE" and tj["model"].get("byte_fallback"):
            vocab = gguf.LlamaHfVocab(path)
            tokens, scores, types = [], [], []
            for text, score, ttype in vocab.all_tokens():
                tokens.append(text), scores.append(score), types.append(int(ttype))
            for i in range(len(tokens), vocab_size):
                tokens.append(f"[PAD{i}]".encode()), scores.append(-1000.0), types.append(int(TT.UNUSED))
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(path, n_vocab=len(tokens))
            kind, pre = "llama", "default"
        elif model_type == "BPE":
            reverse = {i: t for t, i in tokenizer.get_vocab().items()}
            if max(reverse) >= vocab_size:
                raise ValueError(f"the tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}")
            added = tokenizer.get_added_vocab()
            decoder = tokenizer.added_tokens_decoder
            tokens, types = [], []
            for i in range(vocab_size):
                if i not in reverse:
                    tokens.append(f"[PAD{i}]"), types.append(int(TT.UNUSED))
                    continue
                token = reverse[i]
                if token in added:
                    special_token = decoder[i].special or _looks_special(token)
                    types.append(int(TT.CONTROL if special_token else TT.USER_DEFINED))
                else:
                    types.append(int(TT.NORMAL))
                tokens.append(token)
            pre = _pre_tokenizer(tokenizer, tj)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size)
            kind = "gpt2"
        else:
            raise ValueError(f"GGUF export: tokenizer model {model_type!r} (tokenizer.json) is not supported; "
                             f"accepted: byte-level BPE ('gpt2') and SentencePiece-style BPE with byte fallback "
                             f"('llama')")
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        special.add_to_gguf(writer, quiet=True)
        return {"model": kind, "pre": pre, "tokens": [t.decode() if isinstance(t, bytes) else t for t in tokens],
                "chat_template": special.chat_template,
                "eos_token": getattr(tokenizer, "eos_token", None)}


# ------------------------------------------------------------------------------------------ writer


def _add_metadata(writer, arch: Arch, meta: dict) -> None:
    for key, value in meta.items():
        if value is None:
            continue
        full = f"{arch.name}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, (int, np.integer)):
            writer.add_uint32(full, int(value))
        elif isinstance(value, (float, np.floating)):
            writer.add_float32(full, float(value))
        elif isinstance(value, str):
            writer.add_string(full, value)
        else:
            raise TypeError(f"metadata {full}={value!r}: not a scalar")


def _items(tensors) -> Iterator[tuple[str, object]]:
    if isinstance(tensors, Mapping):
        for name in tensors:
            yield name, tensors[name]
    else:
        yield from tensors


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


@dataclass
class _Planned:
    hf_name: str | None
    gguf_name: str
    shape: tuple[int, ...]
    qtype: object


def _plan(arch: Arch, c: dict, specs: list[tuple[str, tuple[int, ...]]], method: str) -> list[_Planned]:
    tied = bool(c.get("tie_word_embeddings"))
    plan, unknown = [], []
    for hf_name, shape in specs:
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads token_embd for a tied output (no output.weight)
        name = arch.gguf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        plan.append(_Planned(hf_name, name, tuple(shape), tensor_type(method, tuple(shape))))
    if unknown:
        raise ValueError(f"GGUF export ({arch.name}): no llama.cpp name for tensors {unknown[:6]}"
                         f"{' ...' if len(unknown) > 6 else ''}")
    return plan


def _atomic_writer(path: Path, arch_name: str):
    gguf = _gguf()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return gguf.GGUFWriter(tmp, arch_name), Path(tmp)


def _write_stream(writer, plan: list[_Planned], values: Iterator[tuple[str, np.ndarray]]) -> None:
    """Header and tensor infos from the plan, then one tensor at a time in the plan's order."""
    gguf = _gguf()
    for p in plan:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype))) if p.shape else 4
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plan:
        name, x = next(values)
        if name != p.gguf_name:
            raise RuntimeError(f"GGUF export: tensor {name!r} arrived where {p.gguf_name!r} was planned")
        writer.write_tensor_data(_encode(x, p.qtype))
    writer.close()


def write_gguf(path, config, tensors, tokenizer=None, quantization_method: str = "f16",
               shapes: Mapping[str, tuple[int, ...]] | None = None, name: str | None = None) -> Path:
    """Write one GGUF file for llama.cpp from HF-named weights.

    `config`: the HF config (or its dict); `tensors`: a mapping or an iterable of `(HF name, array)` (numpy,
    torch or jax; read one at a time); with an iterable, `shapes` gives `{HF name: shape}` in the same order
    (the header goes first). `tokenizer`: a transformers tokenizer or its directory (None: no vocabulary, which
    llama.cpp refuses for a model, so pass one). `quantization_method`: f32, f16, bf16, q8_0.
    """
    gguf = _gguf()
    method = resolve_method(quantization_method)
    if method not in FLOAT_METHODS:
        raise ValueError(f"quantization_method={quantization_method!r} is made by llama.cpp's quantizer; "
                         f"use save_pretrained_gguf (which calls it) or one of {sorted(FLOAT_METHODS)}")
    c = config_dict(config)
    arch = arch_for(c)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if shapes is None:
        if not isinstance(tensors, Mapping):
            raise ValueError("write_gguf: tensors is an iterator, so shapes={name: shape} must be given")
        shapes = {n: _shape(v) for n, v in tensors.items()}
    extra = {n: v for n, v in arch.extra_tensors(c).items()}
    plan = _plan(arch, c, list(shapes.items()), method)
    plan += [_Planned(None, n, v.shape, tensor_type(method, v.shape)) for n, v in extra.items()]

    writer, tmp = _atomic_writer(path, arch.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        # general.name: llama.cpp keys tokenizer quirks on it ("phi3" expects <|endoftext|>), so never the arch name
        writer.add_name(name or Path(str(c.get("_name_or_path") or "")).name or "model")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(_file_type(method))
        _add_metadata(writer, arch, arch.metadata(c))
        if tokenizer is not None:
            add_tokenizer(writer, tokenizer, c["vocab_size"])

        def values():
            tied = bool(c.get("tie_word_embeddings"))
            for hf_name, value in _items(tensors):
                if hf_name == "lm_head.weight" and tied:
                    continue
                x = _transform(arch, c, hf_name, as_float32(value))
                yield arch.gguf_name(hf_name), x
            yield from extra.items()

        _write_stream(writer, plan, values())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------ LoRA


PEFT_PREFIX = "base_model.model."


def write_lora_gguf(path, config, adapter_tensors: Mapping[str, object], adapter_config: Mapping,
                    scalings: Mapping[str, float] | None = None, quantization_method: str = "f16") -> Path:
    """A PEFT adapter as llama.cpp's LoRA GGUF (what convert_lora_to_gguf.py writes): general.type "adapter",
    adapter.type "lora", adapter.lora.alpha, tensors `<gguf weight name>.lora_a` [r, in] / `.lora_b` [out, r]
    with the base's transforms on B's rows (Llama's q/k permutation). llama.cpp scales by alpha / r; where the
    adapter's scaling differs (rslora, alpha_pattern) the ratio is folded into B, so the product is exact.

    `scalings`: {module name: scaling} (None: lora_alpha / r, or / sqrt(r) with use_rslora; an alpha_pattern
    then needs explicit scalings). DoRA, trained biases and modules_to_save have no llama.cpp LoRA form.
    """
    gguf = _gguf()
    method = resolve_method(quantization_method)
    if method not in FLOAT_METHODS:
        raise ValueError(f"quantization_method={quantization_method!r} for a LoRA GGUF: use one of "
                         f"{sorted(FLOAT_METHODS)}")
    c = config_dict(config)
    arch = arch_for(c)
    ac = dict(adapter_config)
    if ac.get("use_dora"):
        raise ValueError("save_method='lora' GGUF: DoRA (use_dora=True) has no llama.cpp LoRA form; "
                         "use save_method='merged_16bit'")
    if ac.get("alpha_pattern") and scalings is None:
        raise ValueError("write_lora_gguf: the adapter has an alpha_pattern; pass scalings={module: scaling}")
    alpha = float(ac["lora_alpha"])
    pairs: dict[str, dict[str, object]] = {}
    for key, value in adapter_tensors.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                                                   r"lora_embedding_B)", key)
        if m is None:
            raise ValueError(f"save_method='lora' GGUF: adapter tensor {key!r} has no llama.cpp LoRA form (only "
                             f"lora_A/lora_B: trained biases, modules_to_save and DoRA need "
                             f"save_method='merged_16bit')")
        pairs.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = value
    entries = []
    for module, ab in pairs.items():
        embedding = "lora_embedding_A" in ab
        a = as_float32(ab["lora_embedding_A" if embedding else "lora_A"])
        b = as_float32(ab["lora_embedding_B" if embedding else "lora_B"])
        r = a.shape[0]
        hf_name = module + ".weight"
        target = arch.gguf_name(hf_name)
        if target is None or (hf_name == "lm_head.weight" and c.get("tie_word_embeddings")):
            raise ValueError(f"save_method='lora' GGUF: module {module!r} has no tensor of its own in llama.cpp's "
                             f"{arch.name} (a tied lm_head?)")
        if scalings is not None:
            s = float(scalings[module])
        else:
            s = alpha / (np.sqrt(r) if ac.get("use_rslora") else r)
        b = b * np.float32(s / (alpha / r))  # llama.cpp multiplies by alpha / r
        b = _transform(arch, c, hf_name, b)  # Llama's q/k row permutation reaches B's rows
        if embedding:
            a = np.ascontiguousarray(a.T)  # convert_lora_to_gguf: token_embd.lora_a is transposed
        entries.append((target + ".lora_a", a))
        entries.append((target + ".lora_b", b))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = [_Planned(None, n, x.shape, tensor_type(method, x.shape)) for n, x in entries]
    writer, tmp = _atomic_writer(path, arch.name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(str(ac.get("base_model_name_or_path") or "")).name or "adapter")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(_file_type(method))
        _write_stream(writer, plan, iter(entries))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------ llama.cpp quantizer


def llama_cpp_quantize(src: Path, dst: Path, method: str) -> Path:
    """K-quants and the other llama.cpp-only types, with llama.cpp's own quantizer (llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(f"quantization_method={method!r} needs llama.cpp's quantizer: {LLAMA_CPP_HINT}; "
                          f"or use one of {sorted(FLOAT_METHODS)}, which are written without it") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(_gguf().LlamaFileType, LLAMA_CPP_METHODS[method]))
    fd, tmp = tempfile.mkstemp(dir=Path(dst).parent, prefix=f".{Path(dst).name}.", suffix=".tmp")
    os.close(fd)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp's llama_model_quantize({method}) failed with code {rc}")
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(dst)


# ------------------------------------------------------------------------------------------ Ollama

# Chat formats Ollama's Go templates can express, recognized by rendering the HF template on a probe chat.
_PROBE = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USER"},
          {"role": "assistant", "content": "ASSISTANT"}]
OLLAMA_TEMPLATES = {
    "chatml": ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nUSER<|im_end|>\n<|im_start|>assistant\n"
               "ASSISTANT<|im_end|>\n",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nUSER<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nASSISTANT<|eot_id|>",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # Zephyr / the project's tiny template: <|role|>\n content eos \n
    "zephyr": ("<|system|>\nSYS{eos}\n<|user|>\nUSER{eos}\n<|assistant|>\nASSISTANT{eos}\n",
               "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{eos}\n{{ end }}<|assistant|>\n"),
    "phi3": ("<|system|>\nSYS<|end|>\n<|user|>\nUSER<|end|>\n<|assistant|>\nASSISTANT<|end|>\n",
             "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"),
}


def ollama_template(tokenizer) -> tuple[str | None, str | None]:
    """(Ollama TEMPLATE, format name) when the chat template renders as a known format, else (None, None)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None, None
    try:
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception:
        return None, None
    eos = getattr(tokenizer, "eos_token", None) or ""
    bos = getattr(tokenizer, "bos_token", None) or ""
    body = rendered[len(bos):] if bos and rendered.startswith(bos) else rendered
    for fmt, (expected, template) in OLLAMA_TEMPLATES.items():
        if body.strip() == expected.replace("{eos}", eos).strip():
            return template.replace("{eos}", eos), fmt
    return None, None


def write_modelfile(directory, gguf_filename: str, tokenizer=None, stop_tokens: Iterable[str] = ()) -> Path:
    """An Ollama `Modelfile` beside the GGUF: FROM ./file.gguf, TEMPLATE when the chat template is a known
    format (otherwise the raw Jinja is noted: it is embedded in the GGUF as tokenizer.chat_template), and
    PARAMETER stop for the end-of-turn tokens the tokenizer has."""
    from fastlora_jax.convert.hf_checkpoint import atomic_write_bytes
    directory = Path(directory)
    lines = [f"FROM ./{gguf_filename}", ""]
    template, fmt = ollama_template(tokenizer)
    if template is not None:
        lines += [f"# chat format: {fmt} (translated from the tokenizer's chat template)",
                  f'TEMPLATE """{template}"""', ""]
    elif tokenizer is not None and getattr(tokenizer, "chat_template", None):
        lines += ["# The chat template was not translated to Ollama's Go template; it is embedded in the GGUF as",
                  "# tokenizer.chat_template (Jinja). The raw Jinja:"]
        lines += ["#   " + line for line in tokenizer.chat_template.splitlines()] + [""]
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    stops = []
    for tok in [getattr(tokenizer, "eos_token", None), *stop_tokens]:
        if tok and tok in vocab and tok not in stops:
            stops.append(tok)
    lines += [f'PARAMETER stop "{tok}"' for tok in stops]
    path = directory / "Modelfile"
    atomic_write_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())
    return path


# ------------------------------------------------------------------------------------------ CausalLM


def gguf_filename(method: str, lora: bool = False) -> str:
    kind = FLOAT_METHODS.get(method) or method.upper()
    return f"{'adapter' if lora else 'model'}.{kind}.gguf"


def merged_source(model):
    """(config dict, {HF name: shape} in order, iterator of (HF name, merged array)) of a LoRA CausalLM, from
    the original 16-bit weights where the base came from them (as save_merged does)."""
    from fastlora_jax.convert.hf_checkpoint import find_checkpoint_files, iter_tensors
    from fastlora_jax.convert.peft import merged_tensors, unties_head
    from fastlora_jax.models.registry import checkpoint_name, checkpoint_tensors, stored_names

    files = in_file = None
    if model.weights_source == "16bit" and getattr(model, "model_dir", None) is not None:
        files = find_checkpoint_files(model.model_dir)
        in_file = stored_names(model.family, files.tensor_to_file)
    elif model.is_4bit:
        warnings.warn("merging into the dequantized NF4 weights in memory (not the original 16-bit weights)",
                      stacklevel=3)

    def base_source(name):
        if files is None or name not in in_file:
            return None
        return next(iter_tensors(files, [in_file[name]]))[1]

    shapes = {name: tuple(shape) for name, shape, _ in checkpoint_tensors(model.family, model.cfg)}
    c = model.config.to_dict()
    c.pop("quantization_config", None)
    if unties_head(model):
        c["tie_word_embeddings"] = False
        embed = f"{model.family.EMBED_TOKENS}.weight"
        shapes["lm_head.weight"] = shapes[embed]
    shapes = {checkpoint_name(model.family, n): s for n, s in shapes.items()}
    values = ((checkpoint_name(model.family, n), v) for n, v in merged_tensors(model, base_source))
    return c, shapes, values


def save_pretrained_gguf(model, save_directory, tokenizer=None, quantization_method="fast_quantized",
                         save_method: str = "merged_16bit") -> list[Path]:
    """Unsloth's `model.save_pretrained_gguf`: see CausalLM.save_pretrained_gguf."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ValueError("quantization_method is an empty list; give one method or several")
    methods = [resolve_method(m) for m in methods]
    if save_method not in ("merged_16bit", "lora"):
        raise ValueError(f"save_method={save_method!r} is not accepted for GGUF; use 'merged_16bit' or 'lora'")
    arch = arch_for(model.config.to_dict())
    if save_method == "merged_16bit" and tokenizer is None:
        raise ValueError("save_pretrained_gguf(tokenizer=None): llama.cpp needs the vocabulary inside the GGUF; "
                         "pass the tokenizer from FastLanguageModel.from_pretrained")
    written = []
    if save_method == "lora":
        layout = model.lora_layout
        scalings = {t.name: float(t.scaling) for t in layout.targets}
        adapter = {k: np.asarray(v) for k, v in model.peft_state_dict().items()}
        for m in methods:
            written.append(write_lora_gguf(directory / gguf_filename(m, lora=True), model.config, adapter,
                                           model.adapter_config(), scalings, quantization_method=m))
        return written
    quantized = [m for m in methods if m in LLAMA_CPP_METHODS]
    if quantized:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ImportError(f"quantization_method={quantized[0]!r} needs llama.cpp's quantizer: {LLAMA_CPP_HINT}; "
                              f"written without it: {sorted(FLOAT_METHODS)}") from None
    floats = [m for m in methods if m in FLOAT_METHODS]
    if quantized and "f16" not in floats and "bf16" not in floats:
        floats.append("f16")  # what llama.cpp quantizes from
    for m in floats:
        c, shapes, values = merged_source(model)
        written.append(write_gguf(directory / gguf_filename(m), c, values, tokenizer, quantization_method=m,
                                  shapes=shapes, name=Path(str(model.name_or_path)).name))
    source = next(p for p in written if p.name.endswith((".F16.gguf", ".BF16.gguf"))) if quantized else None
    for m in quantized:
        written.append(llama_cpp_quantize(source, directory / gguf_filename(m), m))
    final = [p for p in written if gguf_filename(methods[0]) == p.name][0]
    write_modelfile(directory, final.name, tokenizer, arch.stop_tokens)
    return [p for p in written if any(p.name == gguf_filename(m) for m in methods)]
