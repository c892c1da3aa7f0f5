"""retrv.runtime: the light half of retrv-edge. Imports numpy-level dependencies only, never torch.

The public API, re-exported lazily (each name is imported on first use, so `import retrv.runtime` stays cheap):

    from retrv.runtime import Pack, Index, Retriever, Budget
    pack = Pack.open("pack/")
    index = Index.open("index/", pack=pack)            # an index opened with its pack can encode what it is given
    index.add([{"did": "x1", "txt": "a red dress", "img_path": "x1.jpg"}])
    index.delete(["x0"])
    result = Retriever(pack, index).search(text="a red dress", k=50, budget=Budget(think=128, inspect=3))
"""

from retrv.runtime.errors import CheckpointError, InputError, MissingDependencyError, RetrvError

_LAZY = {
    "Pack": "retrv.runtime.pack",
    "Index": "retrv.runtime.index.store",
    "Retriever": "retrv.runtime.retriever",
    "Budget": "retrv.runtime.rerank.budget",
    "Candidate": "retrv.runtime.inputs.corpus",
}

__all__ = ["RetrvError", "CheckpointError", "InputError", "MissingDependencyError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'retrv.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
