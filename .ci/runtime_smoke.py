"""What a user reaches with only the runtime install (`pip install -e .`, no extras) must run there.

CI runs this in the venv `make demo` built, before `make test` adds the test oracles (torch, PEFT, ...), so a
package the library imports but does not declare fails here and not on a user's machine. It imports every
module of the package, runs the CLI's train and export on the tiny model, and runs the README's Python example.
"""

import importlib
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import fastlora_jax

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("fastlora-jax"))


def import_every_module() -> int:
    names = [m.name for m in pkgutil.walk_packages(fastlora_jax.__path__, "fastlora_jax.")]
    for name in names:
        importlib.import_module(name)
    return len(names)


def run(*cmd, cwd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def main() -> int:
    print(f"imported {import_every_module()} modules of fastlora_jax")
    with tempfile.TemporaryDirectory() as tmp:
        run(CLI, "train", "--max-steps", "2", "--max-seq-length", "128", "--output-dir", "out", "--quiet", cwd=tmp)
        run(CLI, "export", "--adapter", "out", "--output", "merged", "--merged", cwd=tmp)
        assert (Path(tmp) / "merged" / "config.json").is_file()

        from fastlora_jax.data import bundled_dataset_path
        from fastlora_jax.tiny import write_tiny_llama
        readme = (ROOT / "README.md").read_text()
        block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
        write_tiny_llama(Path(tmp) / "runs" / "tiny-llama", seed=0)
        (Path(tmp) / "my_chats.jsonl").write_text(bundled_dataset_path().read_text())
        code = block.replace("max_steps=60", "max_steps=2")
        subprocess.run([sys.executable, "-c", code], cwd=tmp, check=True)
        assert (Path(tmp) / "adapter" / "adapter_model.safetensors").is_file()
    print("runtime install: every module imports; train, export and the README example run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
