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
    from fastlora_jax import llama
    from fastlora_jax.families import checkpoint_tensors
    return checkpoint_tensors(llama, llama.Config.from_hf(config))


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
