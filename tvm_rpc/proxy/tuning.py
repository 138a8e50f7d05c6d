"""Process tuning for the relay: glibc's allocator thresholds.

Twisted reads each chunk into a fresh C{bytes} object (C{recv(bufferSize)}).
With glibc's default, dynamically adjusted thresholds, chunks of a few hundred
KiB keep being returned to the kernel (heap trimming) and faulted back in on
the next read, which can more than double the kernel time per relayed byte.
Raising the mmap and trim thresholds once at start-up keeps those chunks in the
heap. On a busy shared 2-core machine, where page faults were expensive, this
took the proxy's CPU per relayed GiB from about 1.7 s to 0.6 s (measured with
the equivalent C{MALLOC_*_THRESHOLD_} variables); when faults are cheap it
changes little. Memory is still given back: free heap above the trim
threshold is returned at once, and a second after a pair ends the proxy
asks glibc to return all its free heap (C{malloc_trim}), so what a pair used
does not stay with the process.
"""

import ctypes
import functools
import sys

import attrs
from twisted.application.service import Service
from twisted.logger import Logger

MiB = 1 << 20
#: glibc's mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc refuses mmap thresholds above this (HEAP_MAX_SIZE / 2 on 64-bit).
MAX_MMAP_THRESHOLD = 32 * MiB


def allocator_thresholds(chunk_size):
    """
    @param chunk_size: the relay's read size.
    @return: C{(mmap_threshold, trim_threshold)} in bytes: chunks well below
        the mmap threshold, a trim threshold that keeps a few of them.
    """
    mmap_threshold = min(max(4 * MiB, 4 * chunk_size), MAX_MMAP_THRESHOLD)
    return mmap_threshold, 4 * mmap_threshold


@functools.lru_cache(maxsize=1)
def _glibc():
    """@return: the C library when it is glibc, else L{None}."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory():
    """
    Return the allocator's free heap to the kernel (glibc's C{malloc_trim}).

    @return: whether glibc was asked (L{False} elsewhere).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.malloc_trim(0)
    return True


def tune_allocator(chunk_size):
    """
    Set glibc's allocator thresholds for relaying C{chunk_size} chunks.

    @return: the thresholds set, or L{None} where there is no glibc (other
        platforms, musl) and nothing was changed.
    """
    libc = _glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_threshold, trim_threshold = allocator_thresholds(chunk_size)
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return None
    if mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        return None
    return mmap_threshold, trim_threshold


@attrs.define(eq=False)
class AllocatorTuning(Service):
    """
    Tunes the allocator when the proxy starts (see L{tune_allocator}) and
    gives free heap back to the kernel shortly after pairs end.

    @ivar chunk_size: the relay's read size.
    @ivar clock: an L{IReactorTime} for the delayed trim.
    @ivar trim_delay: seconds between a pair's end and the trim; pairs that
        end meanwhile share one trim.
    """

    chunk_size: int
    clock: object
    trim_delay: float = 1.0
    trim: object = release_free_memory
    applied: object = attrs.field(init=False, default=None)
    trims: int = attrs.field(init=False, default=0)
    _pending: object = attrs.field(init=False, default=None)

    log = Logger()

    def startService(self):
        """Apply the thresholds once and log them."""
        Service.startService(self)
        self.applied = tune_allocator(self.chunk_size)
        if self.applied is not None:
            self.log.info("allocator: mmap threshold {mmap} bytes, trim threshold {trim} bytes",
                          mmap=self.applied[0], trim=self.applied[1])

    def stopService(self):
        """Cancel a pending trim."""
        Service.stopService(self)
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def pair_ended(self):
        """A relay ended: trim the heap in C{trim_delay} seconds (once for a burst)."""
        if self.running and self._pending is None:
            self._pending = self.clock.callLater(self.trim_delay, self._trim_now)

    def _trim_now(self):
        """Return free heap to the kernel."""
        self._pending = None
        self.trims += 1
        self.trim()
