"""The shape of the code (src/psgrad/README.md): data flows api -> engines -> capture -> rules; verify shares no
code with what it checks; bench, verify and dp use only the public API and the public helper modules; no source
file over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "psgrad"

#: what the tools on top (bench, verify, dp) may import of psgrad: the public API and the public helper modules
PUBLIC = {"psgrad", "psgrad.api", "psgrad.batch", "psgrad.clipping", "psgrad.errors", "psgrad.peers",
          "psgrad.peers.opacus", "psgrad.projection", "psgrad.verify", "psgrad.workloads"}


def _imports(path: Path) -> set[str]:
    """The psgrad modules a source file imports (relative imports resolved)."""
    package = ["psgrad", *path.relative_to(SRC).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("psgrad"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("psgrad"))
    return found


def _files(layer: str) -> list[Path]:
    return sorted((SRC / layer).rglob("*.py"))


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer, forbidden", [
    ("rules", ("psgrad.capture", "psgrad.engines", "psgrad.api")),
    ("capture", ("psgrad.engines", "psgrad.api")),
    ("engines", ("psgrad.api",)),
    ("verify", ("psgrad.rules", "psgrad.clipping", "psgrad.engines", "psgrad.capture", "psgrad._memory")),
])
def test_data_flows_one_way(layer, forbidden):
    bad = [(f.name, m) for f in _files(layer) for m in _imports(f) if any(_inside(m, p) for p in forbidden)]
    assert not bad, f"{layer} imports {bad}"


@pytest.mark.parametrize("layer", ["bench", "verify", "dp"])
def test_tools_use_the_public_api_only(layer):
    own = f"psgrad.{layer}"
    bad = []
    for f in _files(layer):
        for m in _imports(f):
            if _inside(m, own) or m in PUBLIC:
                continue
            parent = m.rpartition(".")[0]  # "from psgrad.batch import Batch" also yields "psgrad.batch.Batch"
            if parent in PUBLIC or _inside(parent, own):
                continue
            bad.append((str(f.relative_to(SRC)), m))
    assert not bad, f"{layer} imports private modules: {bad}"


def test_no_source_file_over_400_lines():
    long = [(str(f.relative_to(SRC)), n) for f in SRC.rglob("*.py") if (n := len(f.read_text().splitlines())) > 400]
    long += [(str(f.relative_to(SRC)), n) for f in SRC.rglob("*.c") if (n := len(f.read_text().splitlines())) > 400]
    assert not long, long
