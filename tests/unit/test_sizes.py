"""Hold the code readable at a glance: no class over ``CLASS_LINES`` lines and no module over
``MODULE_LINES``, so each fits in one's head (docs/design.md, Layers). The longest ones are
printed (``pytest -s tests/unit/test_sizes.py``) so growth is seen before it becomes a limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ringtrain

PACKAGE = Path(ringtrain.__file__).parent
CLASS_LINES = 300
MODULE_LINES = 600


def sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, name) of every class and every module of the package, longest first."""
    classes, modules = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE.parent).as_posix()
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(classes, reverse=True), sorted(modules, reverse=True)


def test_no_class_or_module_is_too_long_to_hold_in_mind():
    classes, modules = sizes()
    print("\nlongest classes:", ", ".join(f"{n} ({lines})" for lines, n in classes[:5]))
    print("longest modules:", ", ".join(f"{n} ({lines})" for lines, n in modules[:5]))
    long_classes = [f"{n} ({lines} lines)" for lines, n in classes if lines > CLASS_LINES]
    long_modules = [f"{n} ({lines} lines)" for lines, n in modules if lines > MODULE_LINES]
    assert not long_classes and not long_modules, (
        f"split along the seams: classes over {CLASS_LINES} lines {long_classes}, "
        f"modules over {MODULE_LINES} lines {long_modules}")
