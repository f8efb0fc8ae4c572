"""Tiny local Hugging Face checkpoints: the embedded default for the main job, and the tests' models.

No model hub is reachable where this project is built and tested, so the default model is made here:
a Llama config from transformers, random weights written with safetensors (numpy only: no torch needed),
and a small byte-level BPE tokenizer trained with `tokenizers` on the bundled dataset, with a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "bundled_data"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _corpus() -> list[str]:
    texts = []
    path = DATA_DIR / "tiny_chat.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [m["content"] for m in row.get("messages", [])]
    return texts or ["The quick brown fox jumps over the lazy dog."]


def write_tiny_tokenizer(directory, vocab_size: int = 512):
    """Train a byte-level BPE on the bundled text and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def llama_tensor_specs(config) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every tensor a checkpoint of this transformers LlamaConfig holds, in order."""
    from fastlora_jax.models import llama
    from fastlora_jax.models.registry import checkpoint_tensors
    return checkpoint_tensors(llama, llama.config(config))


def random_llama_state(config, seed: int = 0, std: float = 0.02, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named random weights: normal(0, std) for matrices and biases, 1 + noise for norms.

    Norm weights are not all ones, so a norm that ignored its weight fails the parity tests.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape, kind in llama_tensor_specs(config):
        noise = rng.standard_normal(shape, dtype=np.float32)
        state[name] = (1.0 + 0.1 * noise if kind == "norm" else noise * std).astype(dtype)
    return state


def write_tiny_llama(directory, seed: int = 0, dtype: str = "float32", tokenizer: bool = True,
                     max_shard_bytes: int | None = None, **overrides) -> Path:
    """Write a random Llama checkpoint (config.json + safetensors [+ index] + tokenizer) that transformers loads.

    `overrides` go to transformers' LlamaConfig (e.g. `rope_parameters`, `head_dim`, `tie_word_embeddings`).
    `max_shard_bytes` splits the weights into shards with a `model.safetensors.index.json`.
    """
    from transformers import LlamaConfig

    from fastlora_jax.convert.hf_checkpoint import numpy_dtype, save_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {**TINY_LLAMA, **overrides}
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    np_dtype = numpy_dtype(dtype)
    state = random_llama_state(config, seed=seed, dtype=np_dtype)
    config.save_pretrained(directory)
    save_tensors(state, directory, max_shard_bytes)
    if tokenizer:
        write_tiny_tokenizer(directory, vocab_size=min(config.vocab_size, 512))
    return directory


TINY_QWEN_VL_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
TINY_QWEN_VL_VISION = {
    # window_size 56 px = 2x2 merged tokens per window; block 1 attends over the whole image
    "qwen2_5_vl": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1]),
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                     temporal_patch_size=2, spatial_merge_size=2),
}
# Token ids of tiny_vision's processor (Qwen's special tokens take ids 0..13 there).
TINY_QWEN_VL_TOKENS = dict(image_token_id=12, video_token_id=13, vision_start_token_id=9, vision_end_token_id=10)


def write_tiny_qwen2_vl(directory, variant: str = "qwen2_5_vl", seed: int = 0, dtype: str = "float32",
                        processor: bool = True, **overrides) -> Path:
    """Write a random Qwen2.5-VL (`variant="qwen2_5_vl"`) or Qwen2-VL (`"qwen2_vl"`) checkpoint with
    transformers' own model class and save_pretrained (so the files are exactly what transformers writes),
    plus, with `processor=True`, the tiny offline processor of tiny_vision.py (its token ids are used).

    Weights: normal(0, 0.02) for matrices and biases, 1 + 0.1·noise for norm weights (a norm that ignored its
    weight would fail the parity tests). `overrides` go to the top-level config; `text_config=` and
    `vision_config=` dicts are merged into the tiny defaults (e.g. `vision_config={"depth": 1}`).
    Needs torch (a test dependency).
    """
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    classes = {"qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
               "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration)}
    if variant not in classes:
        raise ValueError(f"variant={variant!r} is not accepted; use one of {sorted(classes)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = {**TINY_QWEN_VL_TEXT, **overrides.pop("text_config", {})}
    vision = {**TINY_QWEN_VL_VISION[variant], **overrides.pop("vision_config", {})}
    tokens = dict(TINY_QWEN_VL_TOKENS)
    if processor:
        from fastlora_jax.tiny_vision import qwen_vl_config_fields, write_tiny_qwen_vl_processor
        proc = write_tiny_qwen_vl_processor(directory, variant=variant,
                                            patch_size=vision["patch_size"],
                                            temporal_patch_size=vision["temporal_patch_size"],
                                            merge_size=vision["spatial_merge_size"])
        fields = qwen_vl_config_fields(proc, vocab_size=max(text["vocab_size"], -(-len(proc.tokenizer) // 64) * 64))
        text.update(fields["text_config"])
        tokens = {k: fields[k] for k in TINY_QWEN_VL_TOKENS}
    config_class, model_class = classes[variant]
    config = config_class(text_config=text, vision_config=vision, **{**tokens, **overrides})
    config.architectures = [model_class.__name__]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            is_norm = name.endswith(".weight") and any(k in name for k in ("norm", "ln_q"))
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.02 * noise)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    return directory
