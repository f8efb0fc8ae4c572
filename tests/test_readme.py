"""The README's Python example runs as written (on the tiny model, with the bundled data, a few steps)."""

import re
from pathlib import Path

import pytest

from fastlora_jax.data import bundled_dataset_path
from fastlora_jax.tiny import write_tiny_llama

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "runs/tiny-llama" in block and "my_chats.jsonl" in block and "max_steps=60" in block
    write_tiny_llama(tmp_path / "runs" / "tiny-llama", seed=0)
    (tmp_path / "my_chats.jsonl").write_text(bundled_dataset_path().read_text())
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("max_steps=60", "max_steps=4"), "README.md", "exec"), {})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
