"""Shared plumbing of the example scripts: one-line errors and non-zero exits for bad input, output paths checked
before any work and written atomically, and one --help style."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qwen_trtllm import QWenError


def run_cli(main: Callable[[], int | None]) -> None:
    """Run main(); a QWenError becomes `error: <message>` on stderr (from rank 0 only) and exit status 2.

    Under torchrun/mpirun every rank then leaves the process group (together when main returned).
    """
    from qwen_trtllm.logger import setup_logging

    setup_logging()
    returned = False
    try:
        code = main()
        returned = True
    except QWenError as e:
        from qwen_trtllm.runtime.engine import world_from_env

        if world_from_env()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        sys.exit(130)
    distributed = sys.modules.get("qwen_trtllm.runtime.distributed")  # imported only by multi-rank scripts
    if distributed is not None:
        distributed.leave_distributed(wait=returned)
    sys.exit(code or 0)


# --- --help ---------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its example commands stay on their own lines); every option's help ends with
    its default, unless the help already says it or there is none (None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser(description: str | None) -> argparse.ArgumentParser:
    """The argument parser of an example script (its module docstring as the description)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def require_cuda(tool: str) -> None:
    """Exit with one line (`error: ...`, status 2, as run_cli's errors) when no CUDA GPU is visible: for the GPU
    tools of scripts/."""
    import torch

    if not torch.cuda.is_available():
        print(f"error: {tool} times CUDA kernels and needs an NVIDIA GPU: run it on the GPU machine", file=sys.stderr)
        sys.exit(2)


# --- output paths ---------------------------------------------------------------------------------------------
def _probe_writable(directory: Path, what: str) -> None:
    """Create and remove a file in directory: the one check that also holds for root and read-only mounts."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise QWenError(f"{what}: cannot write in {directory} ({e.strerror or e}): choose a writable location") \
            from None


def check_output_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    """Refuse, before any work, an output file that could not be written: a directory, a missing or read-only
    parent directory. None (flag not given) passes."""
    if path is None or str(path) == "":
        return None
    p = Path(path)
    what = f"{flag} {p}"
    if p.is_dir():
        raise QWenError(f"{what} is a directory: give a file name")
    parent = p.parent
    if not parent.exists():
        raise QWenError(f"{what}: directory {parent} does not exist: create it or choose another path")
    if not parent.is_dir():
        raise QWenError(f"{what}: {parent} is not a directory: choose another path")
    _probe_writable(parent, what)
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output directory that could not be written: an existing file, or a path whose
    nearest existing ancestor is not a writable directory (missing directories are created later)."""
    p = Path(path)
    what = f"{flag} {p}"
    if p.exists() and not p.is_dir():
        raise QWenError(f"{what} exists and is not a directory: choose another path")
    ancestor = p.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QWenError(f"{what}: {ancestor} is a file, not a directory: choose another path")
    _probe_writable(ancestor, what)
    return p


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def default_mode(directory: bool = False) -> int:
    """The mode open() / mkdir() would give under the process umask (mkstemp / mkdtemp give 0600 / 0700)."""
    return (0o777 if directory else 0o666) & ~umask()


def give_default_mode(path: str | os.PathLike) -> None:
    """chmod a file written by a library that ignores the umask (safetensors' save_file writes 0600)."""
    os.chmod(path, default_mode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` that replaces it when the block ends without an error (nothing is
    half-written: readers see the old file or the complete new one); the umask's file mode."""
    p = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise QWenError(f"cannot write {p} ({e.strerror or e}): choose a writable location") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """open(path, mode) through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
