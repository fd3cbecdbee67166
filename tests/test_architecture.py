"""The layout's rules, checked on the source: imports go one way, the streaming protocol is built in one place,
and both engines offer what a session needs."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from voxtral_realtime.engine import Engine
from voxtral_realtime.streaming import SessionEngine

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "voxtral_realtime"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["voxtral_realtime", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its text: at the top, inside functions, or under
    ``if TYPE_CHECKING`` (a cycle there still ties the two modules together)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from package import module` imports the module; `from module import name`, the module
                targets.update(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                               for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_function_level_cycles(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # the graph counts an import inside a function (the old api -> gguf_file -> api)
    graph = import_graph()
    assert "voxtral_realtime.gguf_file" in graph["voxtral_realtime.api"]  # imported inside load()
    assert "voxtral_realtime.api" not in graph["voxtral_realtime.gguf_file"]


def _python_files() -> list[Path]:
    return sorted(p for folder in ("src", "tests", "bench") for p in (ROOT / folder).rglob("*.py"))


def _protocol_rebuilt(tree: ast.AST) -> list[int]:
    """Lines that build the protocol's prompt or padding by hand: ``[...streaming_pad_id] * n`` or a product with
    ``n_left_pad_tokens`` / ``n_right_pad_tokens(...)``."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
            continue
        for side in (node.left, node.right):
            pad_list = isinstance(side, ast.List) and any(
                isinstance(e, ast.Attribute) and e.attr == "streaming_pad_id" for e in side.elts)
            left_pad = isinstance(side, ast.Attribute) and side.attr == "n_left_pad_tokens"
            right_pad = isinstance(side, ast.Call) and isinstance(side.func, ast.Attribute) \
                and side.func.attr == "n_right_pad_tokens"
            if pad_list or left_pad or right_pad:
                lines.append(node.lineno)
    return lines


def test_the_streaming_protocol_is_built_in_one_place():
    found = {str(p.relative_to(ROOT)): lines for p in _python_files() if p.name != "test_architecture.py"
             if (lines := _protocol_rebuilt(ast.parse(p.read_text(encoding="utf-8"))))}
    assert found == {"src/voxtral_realtime/protocol.py": found.get("src/voxtral_realtime/protocol.py")}
    assert found["src/voxtral_realtime/protocol.py"]  # the check sees the one place that does it


def test_the_check_sees_a_rebuilt_prompt():
    rebuilt = "ids = [tok.bos_id] + [tok.streaming_pad_id] * (cfg.n_left_pad_tokens + delay)\n" \
              "pad = np.zeros(cfg.n_right_pad_tokens(delay) * step)\n"
    assert _protocol_rebuilt(ast.parse(rebuilt)) == [1, 2]


def _engines() -> list[type]:
    pytest.importorskip("onnxruntime")
    from voxtral_realtime.browser import OnnxEngine

    return [Engine, OnnxEngine]


@pytest.mark.parametrize("method", [n for n, v in vars(SessionEngine).items()
                                    if inspect.isfunction(v) and not n.startswith("_")])
def test_both_engines_offer_what_a_session_needs(method):
    wanted = inspect.signature(getattr(SessionEngine, method))
    arguments = [object() for name in wanted.parameters if name != "self"]
    for engine in _engines():
        offered = inspect.signature(getattr(engine, method))
        offered.bind(None, *arguments)  # raises TypeError if the engine's method cannot take the session's call


def test_the_package_docstring_maps_every_module():
    import voxtral_realtime

    doc = voxtral_realtime.__doc__
    for name in _modules():
        leaf = name.rpartition(".")[2]
        if name != "voxtral_realtime" and leaf != "__main__":
            assert f"``{leaf}``" in doc, f"{name} is not in the package docstring"
