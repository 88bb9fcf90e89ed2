"""Kernels are leaves: the Triton launchers (triton_kernels/) import nothing from the op layer
(effops.ops, effops._backends); shared helpers live in neutral modules (effops._shapes,
effops.reference). Read from the sources, so a new import anywhere in a kernel file fails here."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_LAYER = ("effops.ops", "effops._backends", "effops.nn", "effops.optim", "effops.transforms")


def _imports(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from ("%s.%s" % (node.module, alias.name) for alias in node.names)


def test_triton_kernels_import_no_op_layer():
    files = sorted(glob.glob(os.path.join(ROOT, "triton_kernels", "*.py")))
    assert files
    leaks = {}
    for path in files:
        bad = sorted({m for m in _imports(path) if m.startswith(OP_LAYER)})
        if bad:
            leaks[os.path.basename(path)] = bad
    assert not leaks, leaks
