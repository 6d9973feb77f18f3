"""A fork server for CLI error tests: import the CLIs' heavy libraries once, then run each case in a forked child.

    python tests/cli_forkserver.py MODULE...

reads one JSON request per line on stdin, `{"script": path, "argv": [...], "cwd": dir, "timeout": s}`, and answers one
JSON line on stdout, `{"returncode": int, "stdout": str, "stderr": str}`. The child changes to `cwd`, points file
descriptors 1 and 2 at fresh files, and runs the script as `__main__` with `sys.argv = [script, *argv]`, exactly what
`python script ...` does after its imports. A bad-input case then costs milliseconds instead of the seconds it takes
to import torch, transformers and peft again. A child that outlives its timeout is killed (returncode -9).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_child(script: str, argv: list[str], cwd: str, out_path: str, err_path: str) -> None:
    """In the forked child: redirect output, run the script as __main__, and exit with its status."""
    code = 1
    try:
        os.chdir(cwd)
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = [script, *argv]
        sys.path[0] = str(Path(script).resolve().parent)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if stop.code is not None and not isinstance(stop.code, int):
                sys.stderr.write(f"{stop.code}\n")
        except BaseException:  # noqa: BLE001 - report it exactly as the interpreter would
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait_for(pid: int, timeout: float) -> int:
    """The child's return code as subprocess reports it (negative for a signal); kill it after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.005)


def serve(modules: list[str]) -> None:
    """Import `modules`, then answer requests until stdin closes."""
    sys.path.insert(0, str(REPO_ROOT))
    for name in modules:
        importlib.import_module(name)
    # Python 3.12+ warns about fork() in a process with native threads (torch's); each child is independent here.
    warnings.filterwarnings("ignore", message=".*fork\\(\\) may lead to deadlocks", category=DeprecationWarning)
    channel = sys.stdout
    print(json.dumps({"ready": True}), file=channel, flush=True)
    scratch = tempfile.mkdtemp(prefix="cli_forkserver_")
    for line in sys.stdin:
        request = json.loads(line)
        out_path, err_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request["script"], request["argv"], request["cwd"], out_path, err_path)
        returncode = wait_for(pid, float(request.get("timeout", 120)))
        reply = {"returncode": returncode}
        for key, path in (("stdout", out_path), ("stderr", err_path)):
            reply[key] = Path(path).read_text(encoding="utf-8", errors="replace") if os.path.exists(path) else ""
        print(json.dumps(reply), file=channel, flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
