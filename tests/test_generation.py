"""Generation with a KV cache, LoRA unmerged: parity with transformers + PEFT `generate`, cached logits equal to
the uncached forward, HF's sampling warpers, seeds, eos handling and no recompilation per token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fastlora_jax import FastLanguageModel, generation
from fastlora_jax.models import llama
from fastlora_jax.tiny import write_tiny_llama

NEW = 13  # prompt 7 + 13 = 20 tokens: the chunked-cache test reuses the full forward of that shape
# two prompts of different lengths, left padded with the pad token (0)
PROMPTS = np.array([[5, 17, 99, 230, 41, 7, 300],
                    [0, 0, 0, 12, 400, 33, 8]])
MASK = (PROMPTS != 0).astype(np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny fp32 Llama with an adapter that changes its outputs, and the same model in transformers + PEFT.

    Random tiny models give near-uniform logits, so the embeddings and the head are scaled up: greedy choices
    then have margins far above fp32 noise (asserted where they are compared).
    """
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("gen")
    model_dir = write_tiny_llama(root / "base", seed=11, tokenizer=False)
    state = load_file(model_dir / "model.safetensors")
    state["lm_head.weight"] *= 50
    state["model.embed_tokens.weight"] *= 10
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    model, _ = FastLanguageModel.from_pretrained(str(model_dir), dtype="float32", load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, init_lora_weights=False)
    model.save_pretrained(root / "adapter")

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    hf = PeftModel.from_pretrained(hf, root / "adapter")
    hf.eval()
    # torch's thread pool next to JAX's on a small CPU makes each tiny matmul wait tens of milliseconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, hf
    torch.set_num_threads(threads)


def hf_generate(hf, ids, mask, **kwargs):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, **kwargs)
    return out.numpy()


def full_forward_logits(model, sequences, prompt_mask):
    """Uncached logits of whole sequences, with HF's generate-time mask and position ids."""
    mask = np.concatenate([prompt_mask, np.ones((len(sequences), sequences.shape[1] - prompt_mask.shape[1]),
                                                np.int32)], axis=1)
    positions = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)
    return np.asarray(model(sequences, attention_mask=mask, position_ids=positions).logits), mask, positions


def top2_gap(logits):
    top = np.sort(logits, axis=-1)
    return float((top[..., -1] - top[..., -2]).min())


def test_greedy_matches_transformers_peft_and_uncached_forward(setup):
    model, hf = setup
    assert float(np.abs(np.asarray(model.peft_state_dict()[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])).max()) > 0  # the adapter is on
    out = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, return_dict=True)
    assert out.sequences.dtype == np.int32 and out.sequences.shape == (2, PROMPTS.shape[1] + NEW)
    np.testing.assert_array_equal(out.sequences[:, :PROMPTS.shape[1]], PROMPTS)
    assert top2_gap(out.logits) > 1e-3  # every greedy choice is far from a tie

    expected = hf_generate(hf, PROMPTS, MASK, max_new_tokens=NEW)
    np.testing.assert_array_equal(out.sequences, expected)

    # the logits each token was chosen from equal the uncached full forward at that position
    full, _, _ = full_forward_logits(model, out.sequences, MASK)
    cached_steps = full[:, PROMPTS.shape[1] - 1:-1]
    np.testing.assert_allclose(out.logits, cached_steps, atol=1e-4, rtol=1e-5)
    # ...and the adapter matters: transformers without it generates something else
    with hf.disable_adapter():
        assert (hf_generate(hf, PROMPTS, MASK, max_new_tokens=NEW) != expected).any()


def test_forward_cached_prefill_and_multi_token_chunks(setup):
    """forward_cached directly: a prefill of part of the prompt, then chunks of several tokens at later cache
    indices (across the prompt's end), equal the uncached forward at every non-padded position."""
    model, _ = setup
    seqs = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW)
    full, mask, positions = full_forward_logits(model, seqs, MASK)
    params = model_params(model)
    cos, sin = model.rotary_cos_sin(positions)
    max_len = 24
    mask_full = np.zeros((2, max_len), np.int32)
    mask_full[:, :seqs.shape[1]] = mask
    cache = llama.init_cache(model.cfg, 2, max_len, jnp.float32)
    step = jax.jit(lambda c, ids, co, si, i: llama.forward_cached(model.cfg, params, ids, co, si, c, i,
                                                                  jnp.asarray(mask_full)))
    got = []
    for start in range(0, seqs.shape[1], 5):  # 4 chunks of 5 tokens, one compilation
        logits, cache = step(cache, jnp.asarray(seqs[:, start:start + 5]), cos[:, start:start + 5],
                             sin[:, start:start + 5], jnp.int32(start))
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], full[keep], atol=1e-4, rtol=1e-5)
    assert cache["k"].shape == (model.cfg.num_layers, 2, max_len, model.cfg.num_kv_heads, model.cfg.head_dim)
    assert np.asarray(cache["k"])[:, :, seqs.shape[1] - 1].any()
    assert not np.asarray(cache["k"])[:, :, seqs.shape[1]:].any()  # nothing written past the last chunk


def model_params(model):
    from fastlora_jax.lora import combine
    return combine(model.base_params, model.lora_params, model.lora_meta)


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 97)) * 3).astype(np.float32)
    warp = jax.jit(generation.process_logits)  # the settings are traced: one compilation for all of them
    for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.6, 20, 0.9), (1.3, 1, 0.5)):
        scores = torch.tensor(logits)
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        got = np.asarray(warp(logits, temperature, top_k, top_p))
        expected = scores.numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)


def test_sampling_is_seeded_and_top_k_1_is_greedy(setup):
    model, _ = setup
    greedy = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW)
    assert (model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, temperature=0.0) == greedy).all()

    kwargs = dict(attention_mask=MASK, max_new_tokens=NEW, do_sample=True, temperature=3.0, top_p=0.95)
    a = model.generate(PROMPTS, seed=1, **kwargs)
    b = model.generate(PROMPTS, seed=1, **kwargs)
    c = model.generate(PROMPTS, seed=2, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != greedy).any()
    vocab = model.config.vocab_size
    assert a.min() >= 0 and a.max() < vocab

    top1 = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, do_sample=True, temperature=0.7,
                          top_k=1, seed=5)
    np.testing.assert_array_equal(top1, greedy)


def test_eos_stops_a_row_as_transformers(setup):
    model, hf = setup
    prompt_len = PROMPTS.shape[1]
    greedy = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, eos_token_id=[])
    assert greedy.shape[1] == prompt_len + NEW
    # an eos that row 0 emits at new-token index 2 (and not before) and row 1 never emits
    candidates = [t for t in greedy[0, prompt_len + 2:prompt_len + 4] if t not in greedy[0, prompt_len:prompt_len + 2]
                  and t not in greedy[1, prompt_len:]]
    assert candidates, greedy
    eos = int(candidates[0])
    hit = prompt_len + int(np.flatnonzero(greedy[0, prompt_len:] == eos)[0])
    pad = 511
    out = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(out[0, :hit + 1], greedy[0, :hit + 1])
    assert (out[0, hit + 1:] == pad).all()
    np.testing.assert_array_equal(out[1], greedy[1])  # the other row is unaffected
    np.testing.assert_array_equal(out, hf_generate(hf, PROMPTS, MASK, max_new_tokens=NEW, eos_token_id=eos,
                                                   pad_token_id=pad))

    # once every row has finished, generation stops early (as HF does)
    both = [eos, int(greedy[1, prompt_len + 1])]
    short = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, eos_token_id=both, pad_token_id=pad)
    assert short.shape[1] < prompt_len + NEW
    np.testing.assert_array_equal(short, hf_generate(hf, PROMPTS, MASK, max_new_tokens=NEW, eos_token_id=both,
                                                     pad_token_id=pad))


def test_one_compilation_per_shape(setup):
    model, _ = setup
    prefill, decode = generation.jitted_steps()
    model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW)
    sizes = prefill._cache_size(), decode._cache_size()
    # other prompt contents, another length in the same cache bucket, sampling settings, eos lists: nothing new
    model.generate(PROMPTS[:, ::-1].copy() % 400 + 1, max_new_tokens=NEW + 5)
    model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=NEW, do_sample=True, temperature=0.5, top_k=7,
                   top_p=0.8, seed=3, eos_token_id=[4, 5, 6])
    assert (prefill._cache_size(), decode._cache_size()) == sizes


def test_mask_from_pad_token_rows_and_arguments(setup):
    model, _ = setup
    with_mask = model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=4)
    # no mask given: derived from the pad token (0 in the config), as HF does
    np.testing.assert_array_equal(model.generate(PROMPTS, max_new_tokens=4), with_mask)
    # rows are independent: swapping them swaps the results
    np.testing.assert_array_equal(model.generate(PROMPTS[::-1].copy(), max_new_tokens=4), with_mask[::-1])
    assert model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=0).shape == PROMPTS.shape
    with pytest.warns(UserWarning, match="left padding"):
        model.generate(PROMPTS[:, ::-1].copy(), max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(PROMPTS, top_p=0.0)


def test_for_inference_and_for_training(setup):
    model, _ = setup
    assert FastLanguageModel.for_inference(model) is model and model.training is False
    assert FastLanguageModel.for_training(model) is model and model.training is True
