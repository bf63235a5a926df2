"""
Landlock (Linux 5.13+): rules that the kernel keeps around each program process, which the program's native code
(ctypes) cannot get around as it can the audit hook's (isolation.py):
https://docs.kernel.org/userspace-api/landlock.html.

The runner builds one ruleset when the sandbox starts (kernel_rules): read only what isolation.py's read rule allows,
execute nothing and, where the kernel knows them, make no TCP connection (ABI 4, Linux 6.7) and neither signal nor
reach the abstract Unix sockets of a process outside the program's own (ABI 6, Linux 6.12). Each program process puts
itself under that ruleset, then under a layer of its own that lets it write only in its scratch folder (confine).
Four system calls through ctypes, no dependency. Where the kernel has no Landlock (older, turned off, refused by a
container's seccomp filter, not Linux) version() is None, and the audit hook guards alone.

What an older ABI leaves to native code: below ABI 3 (Linux 6.2) truncating any file the user may write by its path
(truncate(2); opening it to write stays refused), below ABI 4 TCP, below ABI 6 signals to the processes outside; and on
ABI 1 (Linux 5.13 to 5.18) a rename or link from one folder to another fails even inside the scratch folder.
"""

import contextlib
import ctypes
import os
import stat
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)  # the C library: prctl, and Landlock's system calls
with contextlib.suppress(AttributeError):  # (a C library without syscall has no Landlock either)
    _libc.syscall.restype = ctypes.c_long

# The system calls have the same numbers on every architecture; the rights are landlock.h's LANDLOCK_ACCESS_FS_* bits.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1, 1 << 1, 1 << 2, 1 << 3
_CHANGES = sum(1 << bit for bit in range(4, 13))  # remove a folder or a file; make a device, folder, file, socket, link
_REFER, _TRUNCATE = 1 << 13, 1 << 14  # link or rename into another folder (ABI 2); truncate (ABI 3)
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE  # what a rule on a file, not a folder, may give


def _under(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _call(call, *args):
    """landlock_create_ruleset (444), landlock_add_rule (445) or landlock_restrict_self (446)."""
    result = _libc.syscall(ctypes.c_long(call), *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"Landlock: {os.strerror(errno)}")
    return result


def _ruleset(abi, rights, outside=False):
    """A new ruleset (its fd) that handles the file rights `rights` and, with outside=True, where the kernel knows
    them, TCP (bind and connect: ABI 4) and the scopes (signals to, and abstract Unix sockets of, the processes
    outside the program's: ABI 6). What a ruleset handles is refused but where a rule allows it."""
    attr = struct.pack("<QQQ", rights, 3 if outside and abi >= 4 else 0, 3 if outside and abi >= 6 else 0)
    return _call(444, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))


def _allow(ruleset, path, rights):
    """Add the rule: `rights` below path (on a file, its file rights only). A path that does not exist is skipped."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = struct.pack("<Qi", rights, fd)  # struct landlock_path_beneath_attr (packed)
        _call(445, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0))  # 1: a path_beneath rule
    finally:
        os.close(fd)


def _beneath(folder, refused):
    """The rules, [(path, rights)], that let a program read everything below folder but the files below the refused
    folders (no Landlock rule refuses: the folders between are allowed one entry at a time, and listed)."""
    inside = [r for r in refused if _under(r, folder)]
    if not inside:
        return [(folder, _READ_FILE | _READ_DIR)]
    if folder in inside:
        return []
    rules = [(folder, _READ_DIR)]  # the names below it, which Python's imports list, and not the refused files
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            path = os.path.realpath(entry.path)
            if _under(path, folder):  # (a link out of it leads where another rule decides)
                rules += _beneath(path, inside)
    return rules


def version():
    """The version of the kernel's Landlock interface (1 from Linux 5.13 on, each later one refuses more), or None
    where the kernel has none: not Linux, Linux before 5.13, Landlock turned off, or refused by a container."""
    if sys.platform != "linux":
        return None
    try:
        return _call(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # 1: LANDLOCK_CREATE_RULESET_VERSION
    except (OSError, AttributeError):  # ENOSYS, EOPNOTSUPP (built, but off), EPERM (a seccomp filter)
        return None


def kernel_rules(allowed, refused, root):
    """The runner's Landlock ruleset, to which each program process adds a layer of its own (confine): read only
    below the allowed folders but the refused ones (isolation._folders: the most specific folder decides), the
    sandbox's folder root and /proc (the kernel refuses the memory and open files of a process outside the program's
    own), execute nothing, no TCP, no signal to a process outside. (its fd, the kernel's Landlock ABI), or None where
    the kernel has no Landlock."""
    abi = version()
    if abi is None:
        return None
    everything = _READ_FILE | _READ_DIR
    ruleset = None
    try:
        ruleset = _ruleset(abi, _EXECUTE | _READ_FILE | _READ_DIR, outside=True)
        for path, rights in {*(rule for folder in allowed for rule in _beneath(folder, refused)),
                             (os.path.realpath(root), everything), ("/proc", everything)}:
            _allow(ruleset, path, rights)
    except OSError:  # a rule the kernel refuses (a file system it cannot watch, say): none rather than some
        if ruleset is not None:
            os.close(ruleset)
        return None
    return ruleset, abi


def confine(kernel, scratch):
    """Put this program process under the runner's ruleset, then under a layer of its own: write, make, delete and
    rename only below its scratch folder (and write /dev/null). Layers add up: each must allow an access."""
    ruleset, abi = kernel
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: restrict_self asks it of one without CAP_SYS_ADMIN
        raise OSError("Landlock: prctl(PR_SET_NO_NEW_PRIVS) failed")
    _call(446, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    changes = _WRITE_FILE | _CHANGES | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    layer = _ruleset(abi, changes)
    _allow(layer, scratch, changes)
    _allow(layer, os.devnull, changes)
    _call(446, ctypes.c_int(layer), ctypes.c_uint32(0))
    os.close(layer)
