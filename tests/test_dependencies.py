"""Every package the library imports is declared in pyproject.toml: in `dependencies` when a user reaches it
with the runtime install, in the named extra when only an optional path needs it.

(CI also runs the demo, the CLI and the README example in a venv with only the runtime install:
.ci/runtime_smoke.py. That catches what transformers imports lazily on our behalf, which an import scan
cannot see.)"""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "fastlora_jax", ROOT / "kernels", ROOT / "convert"]
# Imported only on optional paths, each inside the function that needs it: module -> the extra declaring it.
OPTIONAL = {"torch": "test", "PIL": "vision", "gguf": "gguf", "tensorboardX": "tensorboard", "wandb": "wandb",
            "matplotlib": "plot", "llama_cpp": "llama-cpp"}
# Optional and not installed by the test extra (it compiles llama.cpp): module -> its distribution.
NOT_IN_TEST_EXTRA = {"llama_cpp": "llama-cpp-python"}
# Needed at run time through another package's lazy import (transformers renders chat templates with jinja2).
LAZY_RUNTIME = ["jinja2"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_modules() -> dict[str, set[str]]:
    """{top-level module: files importing it} over the package's sources, imports inside functions included."""
    found: dict[str, set[str]] = {}
    for source in SOURCES:
        for path in source.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module in ("fastlora_jax", "__future__"):
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if module in NOT_IN_TEST_EXTRA:
            dists = dists or {NOT_IN_TEST_EXTRA[module]}
        if not dists:
            problems.append(f"{module} (imported by {sorted(files)}) is not installed here")
        elif module in OPTIONAL:
            if not dists & extras[OPTIONAL[module]]:
                problems.append(f"{module} -> {dists} is not in the {OPTIONAL[module]!r} extra")
        elif not dists & runtime:
            problems.append(f"{module} -> {sorted(dists)} (imported by {sorted(files)}) is not in dependencies")
    assert not problems, "\n".join(problems)


def test_lazy_runtime_imports_are_declared():
    runtime = {_name(r) for r in _project()["dependencies"]}
    assert set(LAZY_RUNTIME) <= runtime, sorted(set(LAZY_RUNTIME) - runtime)


def test_requires_python_matches_jax():
    # jax 0.11 is released for Python 3.12+ only: on 3.11 the install would fail to resolve jax with an error
    # that never names the Python version.
    assert _project()["requires-python"] == ">=3.12"
