"""chartvlm: fine-tune, evaluate and serve vision-language models on chart question answering.

The seed's four functions are importable from here. They are resolved lazily so that
`import chartvlm` stays cheap (no torch/transformers import at import time).
"""

__version__ = "0.1.0"

_LAZY = {
    "format_data": "chartvlm.prompts",
    "collate_fn": "chartvlm.collate",
    "text_generator": "chartvlm.generate",
    "main": "chartvlm.train",
    "load_chartqa": "chartvlm.data",
    "relaxed_correctness": "chartvlm.metrics",
    "relaxed_accuracy": "chartvlm.metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chartvlm' has no attribute {name!r}")
