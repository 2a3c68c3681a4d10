"""The CPU memory allocator's settings for large arrays (glibc's malloc). Imports nothing heavy (no torch): the
fill, which runs no network, uses it too."""

from __future__ import annotations

_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse by the next large CPU tensor (Linux with glibc only).

    glibc hands each allocation above its mmap threshold (128 KiB by default, adapting up to 32 MiB) fresh
    pages from the kernel and returns them on free, so every feature map of a 512 x 512 slice is
    page-faulted in anew; on a 2-core CPU that costs about a third of the inference time. Raising the
    mmap threshold to its maximum (32 MiB) and the trim threshold keeps those pages in the heap. The
    numbers computed do not change; only where the memory comes from. Idempotent; returns True when the
    settings were applied. ``MISMATCH_NO_MALLOPT=1`` turns it off.
    """
    global _ALLOCATOR_TUNED
    import os
    import sys

    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MISMATCH_NO_MALLOPT"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = (libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
              and libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024) == 1
              and libc.mallopt(m_top_pad, 64 * 1024 * 1024) == 1)
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED
