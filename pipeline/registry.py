"""The one registry of plug-ins: methods, models and datasets, each looked up by name.

A plug-in is a class in a module of its package, registered with a decorator::

    from pipeline.registry import METHODS

    @METHODS.register("my-an")
    class MyAN(Method): ...

The first lookup imports every module of the package (file names may hold hyphens: a method's module is
named like the method, ``pipeline/methods/ll-r.py``, because dvc.yaml tracks it per cell by that name), so a
new plug-in needs no import list. A name registered twice is an error naming both modules; an unknown name
is a one-line error listing the valid ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Generic, TypeVar

from pipeline.errors import SpmlError, unknown_name

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, attribute: str):
        self.kind = kind  # "method": used in error messages
        self.package = package  # where the plug-in modules live
        self.attribute = attribute  # the class attribute that receives the registered name
        self._classes: dict[str, T] = {}

    def register(self, name: str):
        """Class decorator: register the class under ``name`` (and set its name attribute)."""

        def decorator(cls: T) -> T:
            old = self._classes.get(name)
            # the same class seen again (a module imported twice, e.g. by importlib.reload) is not a clash
            if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise SpmlError(f"{self.kind} {name!r} is registered twice: by {old.__module__}.{old.__qualname__} "
                                f"and by {cls.__module__}.{cls.__qualname__}; rename one of them")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a plug-in a test registered for itself)."""
        self._classes.pop(name, None)

    def discover(self) -> None:
        """Import every module of the package, so that their decorators run (modules already imported cost
        a dictionary lookup, so every lookup rescans: a plug-in folder added at run time is seen)."""
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def _has_module(self, name: str) -> bool:
        if not isinstance(name, str) or not name or any(c in name for c in "./\\"):
            return False  # not a module file name (a typo such as "../x" falls through to the full scan)
        try:
            return importlib.util.find_spec(f"{self.package}.{name}") is not None
        except (ImportError, ValueError):
            return False

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._classes

    def get(self, name: str) -> T:
        """The class registered as ``name``; an unknown name is a one-line error listing the valid ones.

        The module named like the plug-in is imported first, and the whole package only when that does not
        register it (an ablation registered in its base method's module, a misspelt name): training a method
        imports only its own module of the package (tests/test_registry.py checks this against dvc.yaml)."""
        if name not in self._classes and self._has_module(name):
            importlib.import_module(f"{self.package}.{name}")
        if name not in self._classes:
            self.discover()
        if name not in self._classes:
            raise unknown_name(self.kind, name, list(self._classes))
        return self._classes[name]


METHODS: Registry = Registry("method", "pipeline.methods", "name")
MODELS: Registry = Registry("model", "pipeline.models", "model_name")
DATASETS: Registry = Registry("dataset", "pipeline.datasets", "name")
