"""What our commands print: their own lines and bars, not those of the libraries under them unless asked."""

from __future__ import annotations

import sys


def quiet_libraries() -> None:
    """Hide the Hugging Face hub's progress bars (downloads), and so transformers' ("Loading weights"), which
    reads the hub's switch when it is imported; if it already is, switch its bars off too."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
