"""Build DeepSpeed's JIT-compiled C++ ops that the suite uses on CPUs, once:
``python -m tests.deepspeed_ops [BUILDER ...]``, by default ``ShareMemCommBuilder`` (``shm_comm``,
DeepSpeed's CPU collectives) and ``CPUAdamBuilder`` (``cpu_adam``, ``train.offload_optimizer``).
Run by ``tests/conftest.py`` in the background at the start of a session; each op is compiled into
torch's extension cache (``~/.cache/torch_extensions``) or, where it is there already, only loaded.
"""
from __future__ import annotations

import sys
import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main(names: list[str]) -> None:
    from deepspeed.accelerator import get_accelerator

    for name in names or OPS:
        t0 = time.monotonic()
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"{name}: not for this machine", flush=True)
            continue
        builder.load()
        print(f"{name}: ready in {time.monotonic() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
