"""edgefleet agent: the device side, and the wire contract that hub and agent share.

The device installs only the base dependencies; nothing in this package may import ``hub``,
``skl2onnx`` or ``sklearn`` (``tests/agent/test_agent_imports.py`` holds that line).
"""

if __name__ != "edgefleet.agent":  # e.g. `import agent` with a source checkout on sys.path
    raise ImportError(
        f"this package is edgefleet's agent; import it as edgefleet.agent, not {__name__!r} "
        "(a second name would load every module twice, with two copies of their state)"
    )

__version__ = "0.1.0"

__all__ = ["__version__"]
