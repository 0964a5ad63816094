"""edgefleet agent: the device side, and the wire contract that hub and agent share.

The device installs only the base dependencies; nothing in this package may import ``hub``,
``skl2onnx`` or ``sklearn`` (``tests/test_agent_imports.py`` holds that line).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
