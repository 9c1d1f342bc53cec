"""The house's floors (ARCHITECTURE.md): ``bank/`` never imports ``method/`` (the maths both use
lives in ``linalg/``, below both), ``linalg/`` imports nothing else of SeqLoRA, and the modules of
``bank/`` import each other without a cycle. Every import counts, also those inside functions."""
import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "seqlora_core"


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from .x import y`` → ``pkg.x`` and,
    when ``pkg.x.y`` is a module, that too)."""
    package = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            for a in node.names:  # `from . import lock` imports the module bank.lock
                candidate = f"{module}.{a.name}"
                if (CORE.parent / Path(*candidate.split("."))).with_suffix(".py").exists():
                    out.add(candidate)
    return out


def _modules(package: str) -> dict[str, set[str]]:
    folder = CORE / package
    return {f"seqlora_core.{package}.{p.stem}": _imports(p) for p in sorted(folder.glob("*.py"))}


def test_bank_never_imports_method():
    upward = {m: sorted(i for i in imps if i == "seqlora_core.method" or i.startswith("seqlora_core.method."))
              for m, imps in _modules("bank").items()}
    assert {m: i for m, i in upward.items() if i} == {}


def test_linalg_imports_nothing_else_of_seqlora():
    for module, imps in _modules("linalg").items():
        assert all(not i.startswith("seqlora_core.") or i.startswith("seqlora_core.linalg") for i in imps), (module, imps)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_bank_modules_import_each_other_without_a_cycle():
    modules = _modules("bank")
    graph = {m: {i for i in imps if i in modules and i != m} for m, imps in modules.items()}
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module, names", [
    ("seqlora_core.method.projector", ["NullSpaceProjector", "BatchedProjection", "block_overlaps",
                                        "normalised_overlap", "orthonormal_factors", "probably_orthogonal"]),
    ("seqlora_core.method.lora", ["Factors", "compose_factors", "LoRAHooks"]),
    ("seqlora_core.method.activation_stats", ["ActivationStats", "second_moment_times", "low_rank_second_moment"]),
    ("seqlora_core.method.targets", ["PRESETS", "TEXT_ATTENTION", "select_layers"]),
    ("seqlora_core.bank.format", ["Bank", "Concept", "load_bank", "FORMAT", "FORMAT_VERSION", "ID_PATTERN",
                                  "ORTHOGONALITY_TOLERANCE", "DEFAULT_EPS", "READABLE_VERSIONS", "token_to_id"]),
    ("seqlora_core.bank.lease_file", ["lease_to_file"]),
])
def test_public_names_stay_where_callers_import_them(module, names):
    import importlib

    mod = importlib.import_module(module)
    assert [n for n in names if not hasattr(mod, n)] == []
