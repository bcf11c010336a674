"""The lance_model library, imported the way this pack was imported: the one place that needs to know.

ComfyUI loads a custom-node folder as a package named after its path, so there the library is that package's
`lance_model` (a `lance_model` installed elsewhere on the path may be another version of it). Installed with
pip, or under pytest, `lance_nodes` and `lance_model` are both top-level packages and `..` does not exist.
Every node module reaches the library as `from .library import lance_model`.
"""
try:
    from .. import lance_model
except ImportError:   # top-level lance_nodes: "attempted relative import beyond top-level package"
    import lance_model

__all__ = ["lance_model"]
