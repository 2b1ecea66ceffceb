"""What Windows' Python below 3.12 cannot do with pipes, imposed on this POSIX process (tests of the worker transport).

On Windows, `select.select` accepts sockets only (WinError 10038 for anything else), `os.set_blocking` exists
only from Python 3.12, and a socket is not a C runtime file descriptor (`os.read`/`os.write` fail on it).
`constraints()` returns (module, attribute, replacement) triples; a replacement of None means "delete it".
"""

from __future__ import annotations

import errno
import os
import select
import stat

NOT_A_SOCKET = 10038  # WSAENOTSOCK


def _fd(obj) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def constraints():
    real_select, real_read, real_write = select.select, os.read, os.write

    def select_sockets_only(rlist, wlist, xlist, *timeout):
        for obj in (*rlist, *wlist, *xlist):
            if not _is_socket(_fd(obj)):
                raise OSError(NOT_A_SOCKET, "An operation was attempted on something that is not a socket")
        return real_select(rlist, wlist, xlist, *timeout)

    def read_not_on_sockets(fd, n):
        if _is_socket(fd):
            raise OSError(errno.EBADF, "Bad file descriptor (a Windows socket is not a file descriptor)")
        return real_read(fd, n)

    def write_not_on_sockets(fd, data):
        if _is_socket(fd):
            raise OSError(errno.EBADF, "Bad file descriptor (a Windows socket is not a file descriptor)")
        return real_write(fd, data)

    return [
        (select, "select", select_sockets_only),
        (os, "set_blocking", None),
        (os, "read", read_not_on_sockets),
        (os, "write", write_not_on_sockets),
    ]


def apply() -> None:
    """For a worker process: impose the constraints for good."""
    for module, name, replacement in constraints():
        if replacement is None:
            delattr(module, name)
        else:
            setattr(module, name, replacement)
