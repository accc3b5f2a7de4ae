import sys

from impq_tui.cli import main

if __name__ == "__main__":    # spawned GPU workers import this module again
    sys.exit(main())
