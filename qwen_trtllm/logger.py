"""Progress and log lines of the long steps (convert, build, engine loading), in TensorRT-LLM's format:

    [12/01/2026-10:00:00] [QWen] [I] Total time of building all engines: 00:00:05

on stderr (stdout stays the scripts' results). On a terminal, progress is a tqdm bar; otherwise (logs, CI, pipes)
a timestamped line now and then. QWEN_TRTLLM_LOG_LEVEL (error, warning, info, debug; default info) sets the level;
under torchrun/mpirun ranks other than 0 log warnings and errors only.
"""

from __future__ import annotations

import logging
import os
import sys
import time

LOGGER = logging.getLogger("qwen_trtllm")
LEVEL_ENV = "QWEN_TRTLLM_LOG_LEVEL"
LOG_EVERY_S = 10.0  # without a terminal: at most one progress line per this many seconds


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%m/%d/%Y-%H:%M:%S", time.localtime(record.created))
        return f"[{stamp}] [QWen] [{record.levelname[:1]}] {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Log the library's lines to stderr (once per process)."""
    if any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    LOGGER.addHandler(handler)
    LOGGER.propagate = False
    level = os.environ.get(LEVEL_ENV, "info").upper()
    rank = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "0")
    LOGGER.setLevel(max(logging.WARNING if rank != "0" else 0, getattr(logging, level, logging.INFO)))


def format_duration(seconds: float) -> str:
    """hh:mm:ss, as TensorRT-LLM prints its build time."""
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _LogProgress:
    """tqdm's interface (update, close, context manager) as occasional log lines."""

    def __init__(self, total: float, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.start = self.last = time.monotonic()

    def _amount(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 1e9:.2f} GB"
        return f"{int(n)} {self.unit}"

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S and self.n < self.total:
            self.last = now
            pct = 100 * self.n / self.total if self.total else 100.0
            LOGGER.info(f"{self.desc}: {pct:.0f}% ({self._amount(self.n)} of {self._amount(self.total)}), "
                        f"{format_duration(now - self.start)} elapsed")

    def close(self) -> None:
        if self.total is not None:
            LOGGER.info(f"{self.desc}: {self._amount(self.n)} in {format_duration(time.monotonic() - self.start)}")
            self.total = None

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def progress(total: float, desc: str, unit: str = "tensors"):
    """A tqdm bar on a terminal (stderr), timestamped log lines otherwise; use as a context manager."""
    if sys.stderr.isatty() and LOGGER.isEnabledFor(logging.INFO):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)
    return _LogProgress(total, desc, unit)
