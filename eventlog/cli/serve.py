"""`eventlog serve`: live event streams and the dashboard over HTTP (needs eventlog[web])."""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

import sys
from typing import Annotated, Any

import typer

from ..errors import EventlogError
from . import DbOption, JsonOption, _settings, app
from ._format import _emit, _note


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="The address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", min=0, max=65535, help="0 picks a free port.")
    ] = 8765,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Refuse every change (405): look, never touch.")
    ] = False,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No token (only on a loopback address).")
    ] = False,
    rotate_token: Annotated[
        bool, typer.Option("--rotate-token", help="Make a new token (signs every browser out).")
    ] = False,
    print_url: Annotated[
        bool, typer.Option("--print-url", help="Print the login URL and exit (no server).")
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Also answer to this Host name (repeatable); others get 403.",
        ),
    ] = None,
    keepalive: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="A keep-alive comment after this much silence."),
    ] = 15.0,
    send_timeout: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Close a stream whose client stops reading."),
    ] = 30.0,
    max_streams: Annotated[
        int, typer.Option(metavar="N", min=1, help="Open event streams at most; beyond, 503.")
    ] = 64,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="Serve Prometheus text at /metrics.")
    ] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Serve live event streams and the dashboard over HTTP (needs eventlog[web]).

    Prints the login URL (one JSON line with --json) and logs to stderr. The token lives
    owner-only in the database's sidecar folder and is reused across restarts; the login
    URL swaps it for a cookie, scripts send 'Authorization: Bearer TOKEN'. Ctrl-C or
    SIGTERM ends every open stream (event: bye) and exits 0. GET /api/v1/stream?topic=P
    streams events as Server-Sent Events, resumable with Last-Event-ID.

    \b
    Examples:
      eventlog --db app.db serve
      eventlog --db app.db serve --read-only --metrics
      eventlog --db app.db serve --print-url
      eventlog --db app.db serve --host 0.0.0.0 --allowed-host box.lan
      curl -N -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8765/api/v1/stream?topic=orders'
    """
    s = _settings(ctx, db, json_)
    from ..web import MISSING_EXTRA_HINT

    try:
        from ..web import server as web
    except ImportError as exc:
        raise EventlogError(f"eventlog serve needs the web extra ({exc.name} is missing)",
                            hint=MISSING_EXTRA_HINT) from None  # fmt: skip
    opts = web.ServeOptions(
        s.path, host=host, port=port, read_only=read_only, no_auth=no_auth,
        rotate_token=rotate_token, allowed_hosts=allowed_host or [], keepalive=keepalive,
        send_timeout=send_timeout, max_streams=max_streams, metrics=metrics,
    )  # fmt: skip
    web.check_options(opts)
    if print_url:
        url = web.login_url(opts, port, web.prepare_token(opts))
        if s.json:
            _emit({"url": url})
        else:
            typer.echo(url)
        return

    def announce(info: dict[str, Any]) -> None:
        if s.json:
            _emit(info)
        else:
            typer.echo(info["url"])
            _note(f"eventlog serve: {info['db']} on {info['base_url']}"
                  + (" (read-only)" if info["read_only"] else "")
                  + ("" if info["auth"] else " (no auth)") + "; Ctrl-C to stop")  # fmt: skip
        sys.stdout.flush()

    web.setup_logging()
    web.serve(opts, announce)
