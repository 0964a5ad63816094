"""edgefleet hub: registry, signing, deployment, telemetry ingest and the admin API.

The hub imports the wire contract from :mod:`agent`; the agent never imports the hub.
"""

if __name__ != "edgefleet.hub":  # e.g. `import hub` with a source checkout on sys.path
    raise ImportError(
        f"this package is edgefleet's hub; import it as edgefleet.hub, not {__name__!r} "
        "(a second name would load every module twice, with two copies of their state)"
    )

from edgefleet.agent import __version__

__all__ = ["__version__"]
