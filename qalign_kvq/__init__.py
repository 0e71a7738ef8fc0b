"""qalign-kvq: large multimodal models as video quality scorers, the Q-Align way."""

__version__ = "0.1.0"

__all__ = ["Scorer", "__version__"]


def __getattr__(name: str):
    """``from qalign_kvq import Scorer`` without importing torch on ``import qalign_kvq``."""
    if name == "Scorer":
        from qalign_kvq.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'qalign_kvq' has no attribute {name!r}")
