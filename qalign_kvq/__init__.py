"""qalign-kvq: large multimodal models as video quality scorers, the Q-Align way."""

__version__ = "0.1.0"
