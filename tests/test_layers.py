"""The torch-free wall: nothing under ``shard_tools/`` imports torch, transformers, accelerate or
``pipeline`` (module level or inside a function), and the packer runs where importing torch fails."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from shard_tools.shard_format import INDEX_FILE, parse_index
from tests.conftest import write_audio

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "transformers", "accelerate", "pipeline")

# Installed as sitecustomize in every process the test starts: importing a forbidden package raises.
# The pack runs with one worker (in-process): a worker whose initializer fails is respawned by
# multiprocessing.Pool without end, so a breach there would hang rather than fail.
BLOCKER = f"""
import sys

class _Wall:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {FORBIDDEN!r}:
            raise ImportError(f"the shard layer imported {{name}}")
        return None

sys.meta_path.insert(0, _Wall())
"""


def forbidden_imports(source: str, where: str) -> list[str]:
    """``where:LINE name`` for every import of a forbidden package anywhere in ``source`` (statements
    at any depth, ``importlib.import_module`` and ``__import__`` of a literal name)."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            names = [node.args[0].value]
        else:
            continue
        found += [f"{where}:{node.lineno} {name}" for name in names if name.partition(".")[0] in FORBIDDEN]
    return found


def test_no_module_of_the_shard_layer_imports_the_torch_side():
    assert forbidden_imports("def f():\n    import torch.nn\n    from pipeline.stream import x\n"
                             "    importlib.import_module('transformers')\n", "t.py") == [
        "t.py:2 torch.nn", "t.py:3 pipeline.stream", "t.py:4 transformers"]  # the check sees them all
    modules = sorted((ROOT / "shard_tools").rglob("*.py"))
    assert len(modules) > 10
    found = [hit for path in modules for hit in forbidden_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_packer_runs_with_torch_imports_blocked(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}

    def pack(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shard_tools.pack", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "the shard layer imported torch" in blocked.stderr  # the wall is up in every child
    shown = pack("--help")
    assert shown.returncode == 0 and "--n-mels" in shown.stdout, shown.stderr
    write_audio(tmp_path / "clips" / "train" / "a.wav", seconds=0.5)
    (tmp_path / "clips" / "train" / "a.txt").write_text("a tone")
    packed = pack(str(tmp_path / "clips"), "--out", str(tmp_path / "out"), "--workers", "1")
    assert packed.returncode == 0, packed.stderr
    index = parse_index((tmp_path / "out" / "train" / INDEX_FILE).read_bytes(), "index.json")
    assert [e.samples for e in index.entries] == [1] and (tmp_path / "out" / "train" / index.entries[0].name).is_file()


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at any depth (``pipeline.x``, ``shard_tools.y``, the scripts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_floors_import_downwards_only_and_without_a_circle():
    """Scripts import ``pipeline`` and ``shard_tools``; ``pipeline`` imports ``shard_tools``; nothing
    imports a floor above its own, and no module reaches itself through others."""
    files = [*ROOT.glob("shard_tools/*.py"), *ROOT.glob("pipeline/*.py"), ROOT / "train_stream.py",
             ROOT / "infer_stream.py"]
    modules = {str(f.relative_to(ROOT).with_suffix("")).replace(os.sep, "."): f for f in files}
    floor = {m: 0 if m.startswith("shard_tools.") else 1 if m.startswith("pipeline.") else 2 for m in modules}
    graph = {m: (project_imports(f) & set(modules)) - {m} for m, f in modules.items()}
    upward = [(m, d) for m, ds in graph.items() for d in ds if floor[d] > floor[m]]
    assert not upward, upward
    done, circles = set(), []

    def visit(module, path):
        if module in path:
            circles.append(path[path.index(module):] + [module])
        elif module not in done:
            for dep in graph[module]:
                visit(dep, path + [module])
            done.add(module)

    for module in graph:
        visit(module, [])
    assert not circles, circles
    assert graph["pipeline.stream"] and graph["train_stream"]  # the check sees imports at all
