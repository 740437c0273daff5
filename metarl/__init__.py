"""metarl: meta-learning reinforcement-learning algorithms in PyTorch."""

__version__ = "0.1.0"

# Exported lazily (module-level __getattr__), so that ``import metarl`` stays light.
_LAZY = {"LearnedOptimizer": "metarl.optimizer"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metarl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
