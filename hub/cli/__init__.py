"""``edgefleet-hub``: argument parsing (:mod:`hub.cli.main`), the command bodies and the demo."""
