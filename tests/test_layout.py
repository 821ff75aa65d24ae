"""The architecture, checked: one door to Optuna, functions that fit on a screen, lazy imports."""

import ast
import subprocess
import sys
from pathlib import Path

import hpsearch

PACKAGE = Path(hpsearch.__file__).parent
MAX_FUNCTION_LINES = 60


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_study_package_imports_optuna():
    outside = [p.relative_to(PACKAGE).as_posix() for p in _modules()
               if p.parent.name != "study" and _imported_roots(p) & {"optuna", "optuna_dashboard", "sqlalchemy"}]
    assert outside == []


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in ('torch', 'optuna', 'plotly') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_parsing_settings_and_spaces_loads_neither_torch_nor_optuna():
    assert _loaded_after("import hpsearch.cli, hpsearch.config, hpsearch.space, hpsearch.specs; "
                         "hpsearch.space.load_space(None)") == set()


def test_help_loads_neither_torch_nor_optuna():
    code = ("import sys; sys.argv = ['hpsearch', '--help']\n"
            "from hpsearch.cli import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', ' '.join(m for m in ('torch', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].strip() == "LOADED"
