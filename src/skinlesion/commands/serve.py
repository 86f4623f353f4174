"""``skinlesion serve``: the web page and JSON API (serve/app.py) under uvicorn."""

from __future__ import annotations

import argparse
import sys

from skinlesion.errors import SkinLesionError
from skinlesion.serve.app import create_app


def main(args: argparse.Namespace) -> None:
    import uvicorn

    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise SkinLesionError("--max-upload-mb and --max-megapixels must be positive")
    app = create_app(args.run_dir, args.max_upload_mb, args.backend, args.max_megapixels)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host}, reachable from other machines; this app has no authentication",
            file=sys.stderr,
        )
    service = app.state.service
    print(f"serving {service.model_id} ({service.backend}) on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
