"""The model-family cases of tests/test_families.py and their tiny random checkpoints (issue 13).

Each case is one tiny configuration of one Hugging Face family, chosen to exercise what differs from Llama:
sliding windows shorter than the test sequences, soft-caps, q/k norms, biases, GQA, tied and untied heads, an
explicit head_dim that is not hidden/heads, mixed layer types with their own rope, partial rotary and longrope.

The checkpoints are written by transformers itself (`model_class(config).save_pretrained`), after every
parameter is redrawn from a torch generator seeded by the case name: transformers initializes biases to zero
and norm weights to ones (zeros for Gemma's `1 + w` norms), which would hide a missing bias or norm weight.
`CASE_FEATURES` names what each case exercises; the suite checks with transformers alone that every feature
is really there and moves the logits (a feature that is a no-op on the oracle tests nothing).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# Test sequences are SEQ tokens long: every sliding window below is shorter, every longrope case's
# original_max_position_embeddings too (so its long factors are the ones in use).
SEQ = 24
WINDOW = 8

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Unsloth's defaults
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# The tokenizer of fastlora_jax.tiny has <pad>=0, <s>=1, </s>=2, <unk>=3.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class FamilyCase:
    name: str
    family: str                    # the family name
    config_class: str              # transformers class names
    model_class: str
    config: dict = field(default_factory=dict)   # overrides of TINY
    features: tuple[str, ...] = ()               # what the case exercises (checked on the oracle)
    default_targets: tuple[str, ...] = SEVEN     # get_peft_model's target_modules when none are given

    @property
    def seed(self) -> int:
        """Every random draw of the case derives from its name: a failure reproduces."""
        return zlib.crc32(self.name.encode())

    def hf_config(self, **overrides):
        import transformers
        config = getattr(transformers, self.config_class)(**{**TINY, **copy.deepcopy(self.config), **overrides})
        config.architectures = [self.model_class]
        return config

    def model_cls(self):
        import transformers
        return getattr(transformers, self.model_class)


def _longrope(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.5 + 0.9 * i for i in range(half)]}


CASES: dict[str, FamilyCase] = {c.name: c for c in [
    # The control: Llama, which fastlora_jax supported before issue 13. If it fails, the harness is wrong.
    FamilyCase(
        "llama_control", "llama", "LlamaConfig", "LlamaForCausalLM",
        dict(head_dim=32, tie_word_embeddings=False), ("gqa", "head_dim", "untied")),
    FamilyCase(
        "mistral", "mistral", "MistralConfig", "MistralForCausalLM",
        dict(head_dim=32, sliding_window=WINDOW, tie_word_embeddings=False),
        ("gqa", "head_dim", "untied", "sliding_window")),
    FamilyCase(
        "qwen2", "qwen2", "Qwen2Config", "Qwen2ForCausalLM",
        # Qwen2 ignores sliding_window unless use_sliding_window; layers >= max_window_layers slide
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        ("gqa", "bias", "tied", "sliding_window", "mixed_layer_types")),
    FamilyCase(
        "qwen3", "qwen3", "Qwen3Config", "Qwen3ForCausalLM",
        dict(head_dim=32, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        ("gqa", "head_dim", "tied", "qk_norm")),
    FamilyCase(
        "qwen3_untied_sliding", "qwen3", "Qwen3Config", "Qwen3ForCausalLM",
        dict(head_dim=24, tie_word_embeddings=False, attention_bias=True, use_sliding_window=True,
             sliding_window=WINDOW, max_window_layers=2, num_key_value_heads=1),
        ("gqa", "head_dim", "untied", "qk_norm", "bias", "sliding_window", "mixed_layer_types")),
    FamilyCase(
        "gemma2", "gemma2", "Gemma2Config", "Gemma2ForCausalLM",
        # layer_types default: sliding, full, sliding. Caps small enough that tanh bends the tiny model's values.
        dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=1.0,
             final_logit_softcapping=2.0, tie_word_embeddings=True),
        ("gqa", "head_dim", "tied", "sliding_window", "mixed_layer_types", "attn_softcap", "final_softcap")),
    FamilyCase(
        "gemma3", "gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, tie_word_embeddings=True,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
        ("gqa", "head_dim", "tied", "qk_norm", "sliding_window", "mixed_layer_types", "rope_per_layer_type")),
    FamilyCase(
        "phi3", "phi3", "Phi3Config", "Phi3ForCausalLM",
        dict(tie_word_embeddings=False, sliding_window=WINDOW,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        ("gqa", "untied", "fused_projections", "partial_rotary", "sliding_window"),
        default_targets=PHI3_TARGETS),
    FamilyCase(
        "phi4_longrope", "phi3", "Phi3Config", "Phi3ForCausalLM",
        # Phi-4-mini's shape of config: tied, GQA, partial rotary 0.75, longrope (short/long factors)
        dict(tie_word_embeddings=True, max_position_embeddings=64, original_max_position_embeddings=16,
             rope_parameters=_longrope(rotary_dim=12)),
        ("gqa", "tied", "fused_projections", "partial_rotary", "longrope"),
        default_targets=PHI3_TARGETS),
]}

FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
assert {c.family for c in CASES.values()} == set(FAMILIES) | {"llama"}


# Standard deviations by module name (the rest: STD). Query/key projections are larger so that attention is
# far from uniform (rope, masks, windows and attention soft-caps then move the logits), and the embedding /
# head so that logits spread widely (greedy choices have margins far above fp32 noise).
STD = 0.02
STD_BY_MODULE = {"q_proj": 0.15, "k_proj": 0.15, "qkv_proj": 0.1, "embed_tokens": 0.1, "lm_head": 0.1}


def randomize_(model, seed: int) -> None:
    """Redraw every parameter of a torch model in place from a generator seeded with `seed`.

    Norm weights go around their identity: 1 + 0.1·N for `w·x` norms (initialized to ones), 0.1·N for Gemma's
    `(1 + w)·x` norms (initialized to zeros). Everything else (matrices, embeddings, biases) is std·N with the
    std of STD_BY_MODULE.
    """
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name.rsplit(".", 2)[-2]:
                if bool((p == 1).all()):
                    p.copy_(1.0 + 0.1 * noise)
                elif bool((p == 0).all()):
                    p.copy_(0.1 * noise)
                else:
                    raise AssertionError(f"{name}: a norm weight initialized to neither ones nor zeros")
            else:
                module = name.rsplit(".", 2)[-2]
                p.copy_(STD_BY_MODULE.get(module, STD) * noise)


def write_family_checkpoint(case: FamilyCase, directory, tokenizer: bool = True) -> Path:
    """config.json + model.safetensors (fp32) as transformers' save_pretrained writes them, randomized, plus
    the tiny tokenizer of fastlora_jax.tiny (which save_pretrained_merged is given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = case.hf_config()
    model = case.model_cls()(config).eval()
    randomize_(model, case.seed)
    model.save_pretrained(directory)
    if tokenizer:
        from fastlora_jax.tiny import write_tiny_tokenizer
        write_tiny_tokenizer(directory, vocab_size=TINY["vocab_size"])
    return directory


def torch_module_list(model) -> list[tuple[str, str]]:
    """(name, kind) of torch's named_modules() on an HF model, kind as a family's `module_list` gives it."""
    import torch
    return [(name, "linear" if isinstance(m, torch.nn.Linear)
             else "embedding" if isinstance(m, torch.nn.Embedding) else "other")
            for name, m in model.named_modules() if name]


def padded_batch(case: FamilyCase, batch: int = 3, seq: int = SEQ):
    """Seeded ids `[batch, seq]` with a left-padded row 0 (5 pads), a right-padded row 1 (4 pads) and a full
    row 2; pads are the pad token. Returns (ids int64, mask int64)."""
    import numpy as np
    rng = np.random.default_rng(case.seed)
    ids = rng.integers(4, TINY["vocab_size"], size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    if batch > 1:
        mask[1, -4:] = 0
    ids[mask == 0] = TINY["pad_token_id"]
    return ids, mask
