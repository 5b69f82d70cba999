"""trunk: the familial model, its FLOP count, data, training and checkpoint format.

Names are resolved lazily, so `import trunk.flops` (the fitting package's only dependency on us) does
not load torch modules, kernels or the model.
"""
import importlib

_EXPORTS = {"FamilyConfig": "trunk.config", "PRESETS": "trunk.config", "get_preset": "trunk.config",
            "ConfigError": "trunk.config", "FamilyModel": "trunk.model", "Stage": "trunk.stage",
            "builtin_path": "trunk.builtin"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trunk' has no attribute {name!r}")
