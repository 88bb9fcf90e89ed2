"""Lazy attribute tables (PEP 562) for package __init__ files: `import effops` stays fast and
imports a submodule only when one of its names is first used."""
import importlib
import sys


def lazy_getattr(package, table):
    """A module-level __getattr__ for `package` resolving names through `table`:
    "pkg.module:attr" names an attribute of a module, "pkg.sub" names a submodule itself."""
    def __getattr__(name):
        if name not in table:
            raise AttributeError("module %r has no attribute %r" % (package, name))
        target = table[name]
        module_name, _, attr = target.partition(":")
        value = importlib.import_module(module_name)
        if attr:
            value = getattr(value, attr)
        setattr(sys.modules[package], name, value)
        return value
    return __getattr__
