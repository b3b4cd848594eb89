"""The Rust classes' docstrings, as `help()` and a REPL show them, are the stubs'."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from warmsocket import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def _stub_docs() -> dict[tuple[str, str], str]:
    """(class, member) -> the member's docstring in `_core.pyi`."""
    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(STUB.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for member in node.body:
            if isinstance(member, ast.FunctionDef) and not member.name.startswith("_"):
                doc = ast.get_docstring(member)
                if doc and (node.name, member.name) not in docs:
                    docs[node.name, member.name] = doc
    return docs


def test_runtime_docstrings_are_the_stubs() -> None:
    """They lived only in the stub: `help(SessionCache.create)` showed a signature
    and nothing else (192 of 206 public members had no `__doc__`)."""
    docs = _stub_docs()
    assert len(docs) > 150
    differing = []
    for (cls, member), doc in docs.items():
        runtime = getattr(getattr(_core, cls), member).__doc__
        if inspect.cleandoc(runtime or "") != doc:
            differing.append(f"{cls}.{member}")
    assert differing == []
