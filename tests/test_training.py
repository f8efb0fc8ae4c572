"""compute_loss equals the HF model's .loss, and LoRA gradients equal torch autograd through PEFT, in every
checkpointing mode; the chunked loss equals the unchunked one."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from conftest import rel_l2
from fastlora_jax import FastLanguageModel
from fastlora_jax.tiny import write_tiny_llama
from fastlora_jax.training import IGNORE_INDEX, chunked_cross_entropy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("m"), seed=11, tokenizer=False, attention_bias=True)
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=False)
    return model_dir, model


def batch(rng, vocab):
    ids = rng.integers(0, vocab, size=(3, 20))
    labels = ids.copy()
    labels[0, :6] = IGNORE_INDEX          # a prompt that is not trained on
    mask = np.ones_like(ids)
    mask[2, -5:] = 0                      # right padding ...
    labels[2, -5:] = IGNORE_INDEX         # ... with its labels ignored, as collators do
    return ids, labels, mask


@pytest.mark.parametrize("mode", ["unsloth", True, False])
def test_loss_and_gradients_match_peft_autograd(tiny, tmp_path, rng, mode):
    model_dir, base = tiny
    model = FastLanguageModel.get_peft_model(base, r=8, lora_alpha=16, init_lora_weights=False, bias="lora_only",
                                             use_gradient_checkpointing=mode)
    ids, labels, mask = batch(rng, model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unsloth" on the CPU: no host memory, recompute instead
        loss = model.compute_loss(model.lora_params, ids, labels, mask)
        grads = jax.grad(lambda lp: model.compute_loss(lp, ids, labels, mask))(model.lora_params)
    model.save_pretrained(tmp_path / "adapter")
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    out = peft(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5 * abs(out.loss.item())
    theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in peft.named_parameters() if p.requires_grad}
    ours = {k: np.asarray(v) for k, v in model.peft_state_dict(grads).items()}
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert np.linalg.norm(value) > 0, key
        assert rel_l2(ours[key], value) < 1e-4, key


def test_chunked_loss_draws_a_dropout_mask_per_chunk(rng):
    """LoRA dropout on the output layer: each chunk gets its own key (folded with its index), so two chunks of
    the same tokens drop different features; the same key gives the same loss again."""
    n, d, vocab, chunk = 16, 32, 40, 8
    h8 = jnp.asarray(rng.standard_normal((chunk, d)), jnp.float32)
    hidden = jnp.concatenate([h8, h8])  # two identical chunks
    weight = jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32)
    t8 = jnp.asarray(rng.integers(0, vocab, chunk))
    targets = jnp.concatenate([t8, t8])

    def dropped(h, key):  # PEFT's dropout on the head's input, then the head
        return (h * jax.random.bernoulli(key, 0.5, h.shape) / 0.5) @ weight.T

    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    total, _ = chunked_cross_entropy(hidden, targets, dropped, chunk, key)
    again, _ = chunked_cross_entropy(hidden, targets, dropped, chunk, key)
    first, _ = chunked_cross_entropy(h8, t8, dropped, chunk, key)  # chunk 0 alone: the same mask as above
    assert float(total) == float(again)
    assert abs(float(total) - 2 * float(first)) > 1e-3 * abs(float(first))  # chunk 1's mask is another


def test_chunked_loss_equals_unchunked(rng):
    n, d, vocab = 37, 16, 50
    hidden = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32)
    targets = rng.integers(0, vocab, n)
    targets[[0, 5, 36]] = IGNORE_INDEX
    targets = jnp.asarray(targets)
    logits_fn = lambda h: h @ weight.T  # noqa: E731
    logits = np.asarray(logits_fn(hidden), np.float64)
    valid = np.asarray(targets) != IGNORE_INDEX
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected = float(np.sum((lse - logits[np.arange(n), np.where(valid, targets, 0)])[valid]))
    for chunk in (1, 8, 37, 64):
        total, count = chunked_cross_entropy(hidden, targets, logits_fn, chunk)
        assert int(count) == valid.sum()
        assert abs(float(total) - expected) < 1e-4 * abs(expected)
