"""Model shapes the benchmarks use, as ANCHORS.md names them: transformers config keyword arguments, with
`model_type` (default "llama") choosing the config class. The non-Llama shapes are the published configs'
(the same as ../shared/bench/torch_peers.py builds for Unsloth, so both sides train the same model)."""

LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={**LLAMA31_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=LLAMA31_ROPE),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
                       sliding_window=None, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, tie_word_embeddings=False),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma-3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                       query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh"),
    "phi-4": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=10, vocab_size=100352, rope_theta=250000.0,
                  tie_word_embeddings=False),
}


def hf_config(shape: str):
    """The transformers config of a benchmark shape (its class from `model_type`), with `architectures` set."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(SHAPES[shape])
    config = AutoConfig.for_model(kw.pop("model_type", "llama"), **{"max_position_embeddings": 131072, **kw})
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config
