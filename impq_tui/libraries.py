"""Third-party libraries' own chatter off: their logging and progress bars would be drawn
over the app's screen or the CLI's progress display."""
from __future__ import annotations

import os


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
