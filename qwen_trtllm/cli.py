"""Shared plumbing of the example scripts: one-line errors and non-zero exits for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable

from qwen_trtllm import QWenError


def run_cli(main: Callable[[], int | None]) -> None:
    """Run main(); a QWenError becomes `error: <message>` on stderr (from rank 0 only) and exit status 2.

    Under torchrun/mpirun every rank then leaves the process group (together when main returned).
    """
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
