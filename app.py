"""Serves dreamlab's web UI: ``python app.py`` (options: ``python app.py --help``)."""

import argparse
import sys
from pathlib import Path

from dreamlab.cli import UserError
from dreamlab.ui import run_app

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--out", type=Path, default=Path("outputs/ui"), help="folder for the jobs' run folders")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs that run at once; the rest queue")
    opts = parser.parse_args()
    try:
        sys.exit(run_app(opts.host, opts.port, opts.share, opts.out, opts.concurrency))
    except UserError as err:
        print(f"dreamlab: error: {err}", file=sys.stderr)
        sys.exit(2)
