"""trunk: the familial model, its FLOP count, data, training and checkpoint format."""
from trunk.config import FamilyConfig, PRESETS, get_preset, ConfigError
from trunk.model import FamilyModel
from trunk.kv_cache import KVCache
from trunk.builtin import builtin_path

__all__ = ["FamilyConfig", "PRESETS", "get_preset", "ConfigError", "FamilyModel", "KVCache", "builtin_path"]
