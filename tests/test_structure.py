"""The package's shape: imports point one way through the tiers of the design, without cycles; the
leaf tier imports no torch or Megatron; every ``noqa`` / ``type: ignore`` says why, and there are few.

Every import counts, at module level or inside a function; only imports under ``if TYPE_CHECKING:``
do not (they never run)."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_moe_reg"

# module (or package) -> tier; a module takes the tier of its longest listed prefix
TIERS = {
    "megatron_moe_reg": 0,  # the package itself (its __init__ only)
    "megatron_moe_reg.errors": 0,
    "megatron_moe_reg.flags": 0,
    "megatron_moe_reg.config": 0,
    "megatron_moe_reg.losses": 1,
    "megatron_moe_reg.metrics": 1,
    "megatron_moe_reg.routers": 2,
    "megatron_moe_reg.experts": 2,
    "megatron_moe_reg.integration": 2,  # the package __init__
    "megatron_moe_reg.integration.megatron": 2,
    "megatron_moe_reg.integration.regularizers": 3,
    "megatron_moe_reg.integration.install": 3,
    "megatron_moe_reg.training": 4,
    "megatron_moe_reg.analysis": 4,
    "megatron_moe_reg.integration.megatron_lm": 4,
    "megatron_moe_reg.studies": 4,
    "megatron_moe_reg.cli": 5,
    "megatron_moe_reg.pretrain": 5,
}
LEAF_FORBIDDEN = ("torch", "megatron", "numpy", "transformer_engine", "apex", "triton")
PURE_TORCH_FORBIDDEN = ("megatron", "transformer_engine", "apex")
MAX_SUPPRESSIONS = 12  # suppression comments allowed in the package


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def tier_of(module: str) -> int | None:
    best = None
    for prefix, tier in TIERS.items():
        exact_only = prefix in (PACKAGE, f"{PACKAGE}.integration")
        if module == prefix or (not exact_only and module.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, tier)
    return None if best is None else best[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, module: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import that runs, package-relative resolved."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in modules else base, child.lineno, top))
            inner_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner_top)

    visit(tree, True)
    return found


def violations(root: Path) -> list[str]:
    """Every import against the tiers, every cycle, and every heavy import of the low tiers."""
    mods = module_names(root)
    names = set(mods)
    problems, graph = [], {m: set() for m in mods}
    for module, path in mods.items():
        tier = tier_of(module)
        if tier is None:
            problems.append(f"{module}: no tier (add it to TIERS in tests/test_structure.py)")
            continue
        for target, line, top in imports(path, module, names):
            root_name = target.split(".")[0]
            if tier == 0 and top and root_name in LEAF_FORBIDDEN:
                problems.append(f"{module}:{line} imports {target} at import time (tier 0 is a leaf)")
            if tier == 1 and root_name in PURE_TORCH_FORBIDDEN:
                problems.append(f"{module}:{line} imports {target} (tier 1 is pure torch)")
            if root_name != PACKAGE or target not in names:
                continue
            graph[module].add(target)
            target_tier = tier_of(target)
            if target_tier is not None and target_tier > tier:
                problems.append(f"{module}:{line} (tier {tier}) imports {target} (tier {target_tier})")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-import)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_imports_point_one_way_without_cycles():
    assert violations(ROOT) == []


@pytest.fixture
def planted(tmp_path):
    """A copy of the package, to plant imports in."""
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(root: Path, relative: str, code: str) -> None:
    path = root / PACKAGE / relative
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_the_check_finds_a_planted_reversed_import(planted):
    _plant(
        planted,
        "losses/specialization.py",
        "def _late():\n    from megatron_moe_reg.training import trainer\n    return trainer",
    )
    found = violations(planted)
    assert any(
        "megatron_moe_reg.losses.specialization" in p and "megatron_moe_reg.training.trainer" in p for p in found
    ), found


def test_the_check_finds_a_planted_cycle_and_a_heavy_leaf_import(planted):
    _plant(planted, "flags.py", "import torch\nfrom megatron_moe_reg import config")
    found = violations(planted)
    assert any("flags" in p and "torch at import time" in p for p in found), found
    assert any(p.startswith("import cycle") and "megatron_moe_reg.config" in p for p in found), found


def test_type_checking_imports_do_not_count(planted):
    _plant(
        planted,
        "config.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from megatron_moe_reg.training.arguments import RunConfig",
    )
    assert violations(planted) == []


SUPPRESSION = re.compile(r"#\s*(noqa|type:\s*ignore)\b([^#\n]*)(#.*)?$")


def suppressions(paths: list[Path]) -> list[tuple[Path, int, str, bool]]:
    """(file, line, comment, has a reason) for every noqa / type: ignore comment."""
    out = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = SUPPRESSION.search(line)
            if match:
                reason = (match.group(3) or "").lstrip("#").strip()
                out.append((path, number, match.group(0), bool(reason)))
    return out


def test_every_suppression_says_why_and_the_package_has_few():
    files = [p for d in (PACKAGE, "tests", "benchmarks", "patches") for p in sorted((ROOT / d).rglob("*.py"))]
    found = suppressions(files)
    assert [f"{p.relative_to(ROOT)}:{n}: {c}" for p, n, c, why in found if not why] == []
    in_package = [s for s in found if PACKAGE in s[0].parts]
    assert len(in_package) <= MAX_SUPPRESSIONS, [f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in in_package]
