"""arkfast: distil multi-agent LLM debate into one model, fast.

``arkfast.LLM`` and ``arkfast.SamplingParams`` (the inference engine) are imported on first use, so
``import arkfast`` stays light.
"""
__version__ = "0.1.0"

_LAZY = {"LLM": "arkfast.engine", "SamplingParams": "arkfast.engine"}

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'arkfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
