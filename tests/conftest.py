"""Test-session settings.

The recurrent cells compile their pointwise kernels by default (``pointwise="auto"``), which
costs seconds per kernel signature; the suite builds cells of dozens of configurations, so
it runs them eager unless ``TT_CONV_POINTWISE`` is set. The compiled kernels are tested
explicitly (``pointwise="compiled"``) in tests/test_pointwise.py against the same float64
transcriptions of the maths.
"""

import os

os.environ.setdefault("TT_CONV_POINTWISE", "eager")
