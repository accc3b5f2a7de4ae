"""impq-tui: the Textual app and the command line on top of the core engine."""
