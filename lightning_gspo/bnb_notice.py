"""A harmless bitsandbytes warning kept off the console.

On CPUs with AVX512-BF16, importing bitsandbytes (which PEFT does) tries to fetch a faster 4-bit CPU kernel
through Hugging Face's optional ``kernels`` package and, when that package is not installed, logs "Failed to load
CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" on every run. Nothing is wrong:
bitsandbytes falls back to its own CPU kernels, and installing ``kernels`` to download code from the hub is not
something a training run should ask for. Only that message with that cause is dropped; any other failure to
load the kernel still shows. ``lightning_gspo.models`` installs the filter when it is imported.
"""

from __future__ import annotations

import logging

LOGGER = "bitsandbytes.backends.cpu.ops"
NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class NoKernelsPackageNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(NOTICE) and "No module named 'kernels'" in message)


def install() -> None:
    """Filter the notice on bitsandbytes' logger (once); must run before bitsandbytes is imported."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, NoKernelsPackageNotice) for f in logger.filters):
        logger.addFilter(NoKernelsPackageNotice())
