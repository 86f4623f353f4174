"""``skinlesion serve``: the web page and JSON API (serve/app.py) under uvicorn."""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from skinlesion.data.images import MAX_IMAGE_PIXELS
from skinlesion.errors import SkinLesionError
from skinlesion.serve.app import create_app


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` once (and let go) so a busy port is one line before the model loads, not a uvicorn
    traceback after. SO_REUSEADDR as uvicorn sets it: a port in TIME_WAIT is free, one with a listener is not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SkinLesionError(f"cannot resolve --host {host} ({e.strerror}); pass an address such as 127.0.0.1") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        if sys.platform != "win32":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                raise SkinLesionError(f"port {port} on {host} is in use; pass --port N") from e
            raise SkinLesionError(
                f"cannot listen on {host} port {port} ({e.strerror or e}); pass another --host or --port"
            ) from e


LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def allowed_hosts(host: str, extra: list[str] | None) -> list[str]:
    """Host headers the server answers to: the loopback names, the bound address, and when bound beyond
    loopback this machine's name and addresses; plus ``--allowed-hosts`` (a DNS name, ``*.example.org``, or ``*``)."""
    names = ["127.0.0.1", "localhost", *extra] if extra else ["127.0.0.1", "localhost"]
    if host not in WILDCARD:
        names.append(host)
    if host not in LOOPBACK:
        hostname = socket.gethostname()
        names += [hostname, socket.getfqdn()]
        try:
            names += socket.gethostbyname_ex(hostname)[2]
        except OSError:
            pass
    return list(dict.fromkeys(n for n in names if n))


def main(args: argparse.Namespace) -> None:
    import uvicorn

    check_port(args.host, args.port)
    hosts = allowed_hosts(args.host, args.allowed_hosts)
    app = create_app(args.run_dir, args.max_upload_mb, args.backend, args.max_megapixels, hosts)
    if args.max_megapixels * 1e6 > MAX_IMAGE_PIXELS:
        print(f"note: --max-megapixels is capped at the project's limit of {MAX_IMAGE_PIXELS / 1e6:g}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host}, reachable from other machines; this app has no authentication",
            file=sys.stderr,
        )
    service = app.state.service
    for note in service.notes:
        print(note, file=sys.stderr)
    print(f"serving {service.model_id} ({service.backend}) on http://{args.host}:{args.port}/", file=sys.stderr)
    if "*" not in hosts and args.host not in LOOPBACK:
        print(f"answering to Host: {', '.join(hosts)} (add names with --allowed-hosts)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
