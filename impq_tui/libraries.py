"""Third-party libraries' own chatter off: their logging and progress bars would be drawn
over the app's screen or the CLI's progress display."""
from __future__ import annotations

import logging
import os
import sys


def quiet_libraries() -> None:
    """Through the environment variables transformers and huggingface_hub read when they
    are imported: importing transformers here would cost the app's first screen about
    0.6 s. Where it is imported already, its settings are changed directly."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torchao (GPTQModel's dependency, which transformers imports wherever it is installed)
    # logs that its kernels for other Python versions and GPUs did not load, and torch
    # warns torchao of its deprecated calls: four alarming lines before every run, none of
    # them the user's to act on. Errors still show.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
