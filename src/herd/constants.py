"""Plain values that the data path writes and the model reads, importable without torch.

They sit below every layer (with :mod:`herd.paths` and :mod:`herd.logs`): importing anything
from ``herd.model`` imports torch (its ``__init__`` builds the backbone's namespace), and the
light users of the data path (``herd.data.packing``, the tokenizer workers of ``herd.prepare``)
must not pay for that. Only constants belong here; this module imports nothing.
"""

IGNORE_INDEX = -100
"""The target of a position that is not scored: where the next token belongs to another document,
is padding, or is not trained on (a prompt). It is also torch's default ``ignore_index``."""
