"""herd.prepare's worker processes: tokenizing documents and writing shards, results in order.

Workers rebuild the tokenizer from its JSON and run single-threaded, so ``num_proc`` processes
use ``num_proc`` cores (``num_proc=1`` works in the calling process, on one thread). Results
come back in the order of the inputs and the work itself is deterministic, so the output does
not depend on ``num_proc``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import tokenizers

_worker_tokenizer: tokenizers.Tokenizer | None = None
T = TypeVar("T")
R = TypeVar("R")


def encode_texts(tokenizer: tokenizers.Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added) as uint32 arrays."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [np.array(encoding.ids, dtype=np.uint32) for encoding in encodings]


class WorkerPool:
    """``num_proc`` worker processes holding a tokenizer (1 = work in this process).

    Use as a context manager. :meth:`encode` tokenizes batches of texts; :meth:`imap` runs any
    picklable function. Both keep at most ``4 * num_proc`` tasks in flight and yield in order.
    """

    def __init__(self, tokenizer_json: str, num_proc: int = 1) -> None:
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        self.num_proc = num_proc
        self._json = tokenizer_json
        self._pool = None

    def __enter__(self) -> WorkerPool:
        if self.num_proc > 1:
            # fork where it is safe (Linux): no re-import of __main__, no start-up cost. Workers
            # are single-threaded; the variable also silences tokenizers' after-fork warning.
            method = "fork" if sys.platform == "linux" else "spawn"
            with _environment("TOKENIZERS_PARALLELISM", "false"):
                context = multiprocessing.get_context(method)
                self._pool = context.Pool(self.num_proc, initializer=_init_worker, initargs=(self._json,))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def encode(
        self, batches: Iterable[T], texts: Callable[[T], list[str]]
    ) -> Iterator[tuple[T, list[np.ndarray]]]:
        """``(batch, token arrays of texts(batch))`` for each batch, in input order."""
        if self._pool is None:
            tokenizer = tokenizers.Tokenizer.from_str(self._json)
            tokenizer.encode_special_tokens = True
            for batch in batches:
                with _environment("TOKENIZERS_PARALLELISM", "false"):  # one process, one core
                    encoded = encode_texts(tokenizer, texts(batch))
                yield batch, encoded
            return
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, self._pool.apply_async(_encode_in_worker, (texts(batch),))))
            if len(pending) >= 4 * self.num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def imap(self, function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``function(item)`` for each item, computed in the workers, in input order."""
        if self._pool is None:
            yield from map(function, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._pool.apply_async(function, (item,)))
            if len(pending) >= 4 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextmanager
def _environment(key: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker_tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    _worker_tokenizer.encode_special_tokens = True


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    if _worker_tokenizer is None:
        raise RuntimeError("tokenizer worker used before _init_worker ran")
    return encode_texts(_worker_tokenizer, texts)
