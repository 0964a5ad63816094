"""The fleet page's static files (index.html, app.js, app.css), served by hub.adapters.web."""
