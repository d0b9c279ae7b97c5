"""Networks components of the bundle."""

from bundle.networks import blocks, cdal  # noqa: F401
