"""`eventlog serve`: live, resumable event streams for browsers and a dashboard for operators.

Needs the `web` extra (`pip install 'eventlog[web]'`: Starlette and uvicorn). Modules:

- `server`: runs uvicorn itself on a socket it bound, so SIGINT/SIGTERM end every open
  stream with an `event: bye` frame and the process exits 0.
- `app`: the Starlette routes, the JSON API under /api/v1 and the pages.
- `stream`: the Server-Sent Events endpoint, our own small ASGI code.
- `auth`: the token, the session cookie, and the Host, Origin and content-type checks.
- `queries`: plans composed from the library's (browse, lag in time, stream pages); no SQL
  text of their own, only `eventlog._sql` constants.
- `static/`: HTML, CSS and ES modules, shipped as package data; no build step.

Nothing here is imported by `eventlog` itself: the base install works without the extra.
"""

from __future__ import annotations

MISSING_EXTRA_HINT = "install the web extra: pip install 'eventlog[web]'"
