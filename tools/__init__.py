"""Command-line tools of dw-d2 (run as scripts: ``python tools/<name>.py``); a package so that
the tests import them by name."""
