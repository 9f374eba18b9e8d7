"""What the command lines share. Their one convention: a problem is one line on stderr,
"error: ...", and exit status 2, before any work is done or anything is written; argparse's own
errors follow it too, without the usage block that would bury the line. Also here: the
argparse type of a path (`path`), Ctrl-C as one line while a command loads, and the memory
setting of the commands that compute (`keep_freed_memory`)."""
import argparse
import ctypes
import os
import signal
import sys


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_args(self, *args, **kwargs):
        # A command reads its flags once its modules are loaded: from here on Ctrl-C raises
        # KeyboardInterrupt again, so that `finally` clauses run (runs.atomic_write removes its
        # temporary file), and uncaught it is one line (_ctrl_c_in_one_line).
        if signal.getsignal(signal.SIGINT) is _stop_now:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return super().parse_args(*args, **kwargs)


def path(text):
    """The argparse type of a file or folder argument. An empty one names nothing, but would
    be read as the current folder or as "not given" (then the default folder, or for the data
    a download): refused instead."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return text


def _stop_now(signum, frame):
    """Ctrl-C while a command line loads torch, numpy and scipy (seconds): one line, and the
    process ends as Ctrl-C ends it. (A KeyboardInterrupt raised inside their import code
    printed a traceback of dozens of frames, or an "Exception ignored" one, or left numpy
    half imported for a RecursionError later.) Nothing has been written yet."""
    print("\nstopped (Ctrl-C)", file=sys.stderr, flush=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _ctrl_c_in_one_line(kind, value, traceback, print_traceback=sys.excepthook):
    """sys.excepthook: an uncaught KeyboardInterrupt (Ctrl-C once the flags are read) is one
    line, not a traceback; anything else prints as before. The process still ends as Ctrl-C
    ends it (status 130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("\nstopped (Ctrl-C)", file=sys.stderr)
    else:
        print_traceback(kind, value, traceback)


# A command line (python train.py, a script of this repository) imports this module first,
# before the modules that take seconds to load. A program that imports the modules (pytest, a
# notebook) keeps its own Ctrl-C. train.py installs its own handler for training, which
# checkpoints (runs.install_ctrl_c).
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv else "")) == _REPOSITORY:
    signal.signal(signal.SIGINT, _stop_now)
    sys.excepthook = _ctrl_c_in_one_line


def keep_freed_memory(pad_bytes=1 << 30):
    """Have glibc's malloc keep freed memory for reuse. By default it gives the memory of freed
    tensors back to the operating system, and the next tensor faults every page in again. Two
    settings, measured on this project's 2-core machine (bench/README.md, *Speed*):
    M_TOP_PAD keeps up to pad_bytes at the top of the heap (DP-SGD's chunks of per-example
    gradients faulted up to 100,000 pages a second without it; the README's command took 34.5
    minutes, against 27.8 with it), and M_MMAP_MAX = 0 takes large blocks from the heap too
    (by default a block above 32 MiB, such as one of Inception's activations for FID, is mapped
    for itself and unmapped when freed: 2.5 million page faults per 300 images, 14 % of their
    time). Only where memory comes from changes, not the arithmetic. Elsewhere (macOS, another
    C library) this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-2, pad_bytes)  # M_TOP_PAD
        # M_MMAP_MAX: no block mapped for itself (glibc still maps one if the heap cannot grow)
        libc.mallopt(-4, 0)
    except (OSError, AttributeError):
        pass
