"""herd: train Llama-3-style models through every stage of the Llama 3 recipe."""

__version__ = "0.1.0"
