"""edgefleet hub: registry, signing, deployment, telemetry ingest and the admin API.

The hub imports the wire contract from :mod:`agent`; the agent never imports the hub.
"""

from agent import __version__

__all__ = ["__version__"]
