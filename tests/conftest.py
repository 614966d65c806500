"""pytest configuration shared by every gradzip test file.

The first statements run before anything can import Triton: without a CUDA device the
Triton kernels can still be executed, on CPU tensors, by Triton's interpreter, and the
interpreter is chosen when a kernel is decorated, so the variable must be set first.
"""

import os


def _cuda_device_present() -> bool:
    import torch  # torch does not import triton at import time

    return torch.cuda.is_available()


if not _cuda_device_present() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

# Imported only now: it imports gradzip, and nothing may import triton before the line above.
import backends


def pytest_report_header(config) -> list[str]:
    """Say up front which (backend, device) pairs the op tests run on, and why not others."""
    return backends.describe_matrix()
