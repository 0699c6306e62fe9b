"""Hypothesis profiles: CI replays a fixed set of examples (derandomized), so a green CI is
reproducible; local runs and tests/repeat_distributed.sh keep exploring new random examples."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
