"""What the command lines share. Their one convention: a problem is one line on stderr,
"error: ...", and exit status 2, before any work is done or anything is written; argparse's own
errors follow it too, without the usage block that would bury the line. Also here: the
argparse type of a path (`path`), and one setting of the process, for speed: keep_freed_memory."""
import argparse
import ctypes


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")


def path(text):
    """The argparse type of a file or folder argument. An empty one names nothing, but would
    be read as the current folder or as "not given" (then the default folder, or for the data
    a download): refused instead."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return text


def keep_freed_memory(pad_bytes=1 << 30):
    """Have glibc's malloc keep up to pad_bytes of freed memory for reuse. By default it gives
    the memory of freed tensors back to the operating system, and the next chunk of per-example
    gradients faults every page in again: measured on this project's 2-core machine, up to
    100,000 page faults a second in DP-SGD, and the README's command took 34.5 minutes, against
    27.8 with the memory kept (bench/README.md). Only where memory comes from changes, not the
    arithmetic. Elsewhere (macOS, another C library) this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-2, pad_bytes)  # M_TOP_PAD: free memory kept when the heap grows or shrinks
    except (OSError, AttributeError):
        pass
