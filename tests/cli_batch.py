"""Run many dskd commands in one process (imports and the process group paid once), for the
table-driven bad-input tests: reads {"cases": [[name, argv], ...], "watch": folder} as JSON on
stdin, prints one JSON object per case: its exit code, what it wrote to stderr, and the
content digest of the watched folder afterwards."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from conftest import tree_digest


def main() -> None:
    from dskd.cli import main as dskd_main

    request = json.load(sys.stdin)
    watch = Path(request["watch"])
    results = {}
    for name, argv in request["cases"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = dskd_main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
            except BaseException as exc:  # noqa: BLE001 - a traceback is a finding, not a crash of the batch
                err.write(f"{type(exc).__name__}: {exc}\n")
                code = "traceback"
        results[name] = {"code": code, "stderr": err.getvalue(), "digest": tree_digest(watch)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
