"""Simulated interruptions for the resume tests."""


def interrupt_on_call(make_fn, n: int = 2):
    """Wraps a batch-function factory so that each function it makes raises KeyboardInterrupt on its
    n-th call (as a user's Ctrl-C in the middle of a run)."""

    def make(*args, **kwargs):
        fn = make_fn(*args, **kwargs)
        calls = {"n": 0}

        def wrapped(*a):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return fn(*a)
        return wrapped

    return make
