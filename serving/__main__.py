"""`python -m serving HOST PORT`: the agent server itself (`valifi serve` runs it under
its supervisor, with the shared metrics and status folders set up)."""

import logging
import sys

from core.settings import Settings
from serving.api import serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(Settings(), sys.argv[1], int(sys.argv[2]))
