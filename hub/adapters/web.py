"""The fleet page's files (``hub/web``, installed as ``edgefleet.hub.web``), served by the hub at
``/ui`` so there is no separate service to run. The page is static: it holds no data and no
secret, asks the operator for a token, and reads and acts through the same admin API as the CLI
(``Authorization: Bearer``). Devices and hubs may have no internet, so nothing is loaded from
elsewhere: the charts are drawn as SVG by the page's own script.

The Content-Security-Policy allows scripts, styles and connections to this origin only, no
inline script and no framing, so data that reached the hub from a device (a name, an event
message) cannot run as script even if a rendering bug let it into markup; the page itself only
ever sets text (``textContent``), never HTML.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["WEB_CSP", "web_file"]

WEB_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "app.css": "text/css; charset=utf-8"}


def web_file(name: str) -> tuple[bytes, str] | None:
    """``(bytes, content type)`` of one of the page's files, or None for any other name."""
    content_type = FILES.get(name)
    if content_type is None:
        return None
    return resources.files("edgefleet.hub.web").joinpath(name).read_bytes(), content_type
