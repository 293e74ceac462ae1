"""The import layers, read from the source (ast, nothing imported): a module may import its own
layer and the layers below it, never one above.

    base      utils/*.py (cli, errors, fileio, images, strategy)   imports nothing else of ours
    models    models/ (network, math, weights, configs)            base
    data      data/ (pairs, shards, real images)                   base, models
    train     utils/train/                                         base, models, data
    evaluate  utils/evaluate/                                      base, models, data
    entry     training.py, eval.py, models/convert.py, bench/      anything

utils/train and utils/evaluate are siblings: neither imports the other.
Imports inside functions count too: a deferred import is still a dependency.
"""
import ast
import os

from tests.helpers import ROOT

ENTRY = "entry"
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "data": {"base", "models", "data"},
    "train": {"base", "models", "data", "train"},
    "evaluate": {"base", "models", "data", "evaluate"},
}
OURS = ("utils", "models", "data", "training", "eval", "bench")


def layer_of(rel: str) -> str:
    """The layer of a repository file (path relative to ROOT, '/'-separated)."""
    if rel in ("training.py", "eval.py", "models/convert.py") or rel.startswith("bench/"):
        return ENTRY
    for prefix, layer in (("utils/train/", "train"), ("utils/evaluate/", "evaluate"),
                          ("models/", "models"), ("data/", "data"), ("utils/", "base")):
        if rel.startswith(prefix):
            return layer
    raise AssertionError(f"{rel}: no layer; add it to tests/test_layers.py")


def module_file(module: str) -> str | None:
    """The repository file of a dotted module name (a package's __init__.py), or None."""
    path = module.replace(".", "/")
    for rel in (path + ".py", path + "/__init__.py"):
        if os.path.isfile(os.path.join(ROOT, rel)):
            return rel
    return None


def imported_files(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, repository file) of every import of ours in a module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from data import shards` names the module data.shards, not the package data
            names = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}")
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in OURS and (rel := module_file(name)):
                found.append((node.lineno, rel))
    return found


def library_files() -> list[str]:
    out = []
    for top in ("utils", "models", "data"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            out += [os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                    for f in files if f.endswith(".py")]
    return sorted(out)


def test_no_layer_imports_a_higher_one():
    wrong = []
    for rel in library_files():
        layer = layer_of(rel)
        if layer == ENTRY:
            continue
        with open(os.path.join(ROOT, rel)) as f:
            tree = ast.parse(f.read(), rel)
        for line, target in imported_files(tree):
            if layer_of(target) not in ALLOWED[layer]:
                wrong.append(f"{rel}:{line} ({layer}) imports {target} ({layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_violation():
    """The rule is not vacuous: an upward import, also one deferred into a function, is found."""
    tree = ast.parse("import numpy\nfrom utils.cli import run\n"
                     "def f():\n    from data import shards\n")
    assert imported_files(tree) == [(2, "utils/cli.py"), (4, "data/shards.py")]
    assert layer_of("data/shards.py") not in ALLOWED["models"]
    assert layer_of("utils/evaluate/fid.py") not in ALLOWED["train"]


def test_quiet_tensorflow_is_never_called_on_import():
    """Only entry points quieten TensorFlow, and only when run (utils.cli.run, or under
    `if __name__ == "__main__"`): importing a library module changes no process state."""
    calls = []
    for rel in library_files():
        if layer_of(rel) == ENTRY or rel == "utils/cli.py":
            continue
        with open(os.path.join(ROOT, rel)) as f:
            tree = ast.parse(f.read(), rel)
        for node in tree.body:  # module level only; a __main__ guard is an `if`, skipped
            for sub in ast.walk(node) if not isinstance(node, (ast.If, ast.FunctionDef,
                                                               ast.ClassDef)) else ():
                if isinstance(sub, ast.Call) and getattr(sub.func, "id", "") == "quiet_tensorflow":
                    calls.append(f"{rel}:{sub.lineno}")
    assert not calls, calls
