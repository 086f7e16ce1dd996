"""Simulated interruptions for the resume tests."""


class _Interrupting:
    """``fn`` that raises KeyboardInterrupt on its n-th call; its other attributes are ``fn``'s."""

    def __init__(self, fn, n: int):
        self._fn, self._n, self._calls = fn, n, 0

    def __call__(self, *args):
        self._calls += 1
        if self._calls == self._n:
            raise KeyboardInterrupt
        return self._fn(*args)

    def __getattr__(self, name):
        return getattr(self._fn, name)


def interrupt_on_call(make_fn, n: int = 2):
    """Wraps a batch-function factory so that each function it makes raises KeyboardInterrupt on its
    n-th call (as a user's Ctrl-C in the middle of a run)."""

    def make(*args, **kwargs):
        return _Interrupting(make_fn(*args, **kwargs), n)

    return make
