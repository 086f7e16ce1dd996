"""TensorFlow for input pipelines only: imported lazily, quiet, and never holding an accelerator.

JAX owns every GPU/TPU in this project. TensorFlow is used for ``tf.data`` and record I/O, so it is
imported through :func:`import_tf`, which hides all accelerators from TensorFlow before it can
initialise them (TF otherwise reserves most GPU memory at its first op).
"""

import contextlib
import os
import sys
import tempfile
import warnings

_TF = None


@contextlib.contextmanager
def _captured_stderr():
    """Holds back what C++ libraries print to fd 2 while loading; replays it if loading fails."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. some notebook kernels)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def import_tf():
    """Returns the ``tensorflow`` module with GPUs and TPUs hidden from it."""
    global _TF
    if _TF is not None:
        return _TF
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF's oneDNN CPU kernels round differently from its own kernels (its start-up message says so);
    # the input pipeline and the reference comparisons use TF's own kernels.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    with _captured_stderr():
        import tensorflow as tf  # lazy on purpose: accelerators are hidden from it right below

        held = []
        for kind in ("GPU", "TPU"):
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError):
                # RuntimeError: TF was already initialised by someone else; ValueError: no such kind.
                if tf.config.get_visible_devices(kind):
                    held.append(kind)
        tf.constant(0)  # initialises the runtime (and its start-up log lines) inside the capture
    for kind in held:
        warnings.warn(f"TensorFlow was initialised before advalign_jax could hide the {kind}s from it; "
                      "it may hold accelerator memory that JAX needs. Import advalign_jax data modules "
                      "before running any TensorFlow op.", RuntimeWarning, stacklevel=2)
    _TF = tf
    return tf
