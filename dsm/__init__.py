"""dsm: fast streaming inference for Kyutai's Delayed Streams Modeling speech models."""

__version__ = "0.1.0"
