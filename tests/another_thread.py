"""A call made from another thread while a step runs: the engine's and the runtimes' lock must make it wait for the
step (it used to run inside it, corrupting both threads' streams)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CallFromAnotherThread:
    """``call`` in a thread of its own, keeping what it returns and the error it raises."""

    def __init__(self, call: Callable[[], object]):
        self.result: object = None
        self.errors: list[Exception] = []
        self._thread = threading.Thread(target=self._run, args=(call,))

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.result = call()
        except Exception as e:
            self.errors.append(e)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start_inside_the_step(self) -> None:
        """Start it from a hook and give it time: it must still be waiting when the hook returns."""
        self._thread.start()
        self._thread.join(timeout=0.5)
        assert self._thread.is_alive(), "the other thread's call ran inside the step"

    def join(self) -> object:
        """Wait for the call after the step; its result (its error fails the test)."""
        self._thread.join()
        assert not self.errors, self.errors
        return self.result
