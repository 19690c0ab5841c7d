"""Files written whole or not at all."""

import contextlib
import os
import tempfile

__all__ = ["write_atomic"]


def write_atomic(path, data, mode):
    """Write a whole file or nothing: readers never see half a certificate or CRL."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
