"""The notebooks run start to end on the tiny local model (they are written for a real model on a GPU)."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # test extras; the GPU machine runs `pytest -m gpu` without them
NotebookClient = pytest.importorskip("nbclient").NotebookClient

from fastlora_jax.tiny import write_tiny_llama

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
def test_qlora_quickstart_runs(tmp_path, monkeypatch):
    model_dir = write_tiny_llama(tmp_path / "tiny-llama", seed=0)
    monkeypatch.setenv("FASTLORA_MODEL", str(model_dir))
    monkeypatch.setenv("FASTLORA_MAX_STEPS", "20")
    monkeypatch.setenv("FASTLORA_OUTPUT_DIR", str(tmp_path / "adapter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / "qlora_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trainable params:" in outputs
    assert "relative L2 difference" in outputs
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # the loss curve shown inline (IPython.display.Image of loss.png) and the GGUF export
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert (tmp_path / "adapter" / "loss.png").is_file()
    assert (tmp_path / "adapter-gguf" / "model.Q8_0.gguf").is_file()


@pytest.mark.slow
def test_vision_quickstart_runs(tmp_path, monkeypatch):
    """Without FASTLORA_MODEL the notebook writes its own tiny Qwen2.5-VL (with transformers, as a newcomer's
    laptop would) and runs every step on it: 4-bit load, LoRA on both stacks, collator, SFTTrainer, generate, save."""
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need torchvision")
    pytest.importorskip("PIL")
    monkeypatch.delenv("FASTLORA_MODEL", raising=False)
    monkeypatch.setenv("FASTLORA_MAX_STEPS", "6")
    monkeypatch.setenv("FASTLORA_OUTPUT_DIR", str(tmp_path / "adapter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / "vision_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trainable params:" in outputs and "model.visual.blocks.0.attn.qkv" in outputs
    assert "6 steps; logged losses:" in outputs
    assert (tmp_path / "runs" / "tiny-qwen2.5-vl" / "config.json").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "visual" in config["target_modules"] and "language_model" in config["target_modules"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_mllama_quickstart_runs(tmp_path, monkeypatch):
    """Llama 3.2 Vision (issue 14): without FASTLORA_MODEL the notebook writes a tiny random Mllama with its
    processor and runs every step on it: 4-bit load, LoRA on the vision encoder and the language model's self- and
    cross-attention layers, collator, SFTTrainer, generate with an image, save."""
    pytest.importorskip("torchvision", reason="transformers' MllamaImageProcessor needs torchvision")
    pytest.importorskip("PIL")
    monkeypatch.delenv("FASTLORA_MODEL", raising=False)
    monkeypatch.setenv("FASTLORA_MAX_STEPS", "6")
    monkeypatch.setenv("FASTLORA_OUTPUT_DIR", str(tmp_path / "adapter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / "mllama_vision_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trainable params:" in outputs and "model.language_model.layers.1.cross_attn" in outputs
    assert "cross_attention_mask" in outputs and "6 steps; logged losses:" in outputs
    assert (tmp_path / "runs" / "tiny-mllama" / "config.json").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "vision_model" in config["target_modules"] and "language_model" in config["target_modules"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
