"""A local Hugging Face Hub for the `hf://` tests: olah (a self-hosted Hub mirror from PyPI)
serving the SmolLM2 repository and the example chat dataset built by make_repo.py as a local mirror, behind nginx that does
what an enterprise mirror's gateway does — refuse requests without the right bearer token — and
logs every request, so a test can count downloads.

    python tests/hub/server.py serve --token TOKEN --ready-file F   # until killed

writes `{"endpoint": ..., "access_log": ..., "repo": ...}` to F once both answer. Tests import
`Hub` instead. olah runs from its own venv (its pins differ from the reference venv's), created
once under $FINETUNE_CACHE; nginx comes from Debian (scripts/ensure-nginx.sh).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OLAH_VERSION = "0.5.4"
REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATASET_ID = "finetune-tests/chat-examples"


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))


def olah_cli() -> Path:
    """olah in its own venv, installed once."""
    venv = cache_dir() / f"olah-venv-{OLAH_VERSION}"
    cli = venv / "bin" / "olah-cli"
    if not cli.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"olah=={OLAH_VERSION}"], check=True)
    return cli


def mirror_dir() -> Path:
    """Where the mirror's repositories live, built or not."""
    return cache_dir() / "hub-mirror"


def mirror_root() -> Path:
    """The directory olah serves as a local mirror (`models/ORG/NAME` git repositories), built."""
    root = mirror_dir()
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "make_repo.py"), str(root)], check=True,
                   stdout=subprocess.DEVNULL)
    return root


def repo_dir() -> Path:
    """The served repository (built by `mirror_root`, which `Hub` calls)."""
    return mirror_dir() / "models" / REPO_ID


def dataset_dir() -> Path:
    """The served dataset repository (built by `mirror_root` too)."""
    return mirror_dir() / "datasets" / DATASET_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, ok=(200, 401), seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not answer in {seconds} s")
        time.sleep(0.3)


NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    log_format hub '$request_method $uri $status $body_bytes_sent';
    access_log {work}/access.log hub;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            # The gateway of a private mirror: only the bearer of this token gets through.
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
            proxy_pass http://127.0.0.1:{olah_port};
            proxy_set_header Host 127.0.0.1:{port};
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class Hub:
    """olah + nginx, started on free ports; `endpoint` is what HF_ENDPOINT names."""

    def __init__(self, token: str):
        self.token = token
        self.work = Path(tempfile.mkdtemp(prefix="hub-"))
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Hub":
        subprocess.run([str(ROOT / "scripts" / "ensure-nginx.sh")], check=True)
        mirror = mirror_root()
        olah_port, port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        (self.work / "olah.toml").write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {olah_port}\n'
            f'repos-path = "{self.work / "olah-repos"}"\n'
            f'mirrors-path = ["{mirror}"]\n'
            f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
            "[accessibility]\noffline = true\n")
        olah_log = open(self.work / "olah.log", "w")
        self.procs.append(subprocess.Popen([str(olah_cli()), "-c", str(self.work / "olah.toml")],
                                           cwd=self.work, stdout=olah_log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        (self.work / "nginx.conf").write_text(NGINX_CONF.format(
            work=self.work, port=port, olah_port=olah_port, token=self.token))
        self.procs.append(subprocess.Popen(
            ["nginx", "-p", str(self.work), "-c", str(self.work / "nginx.conf"), "-g", "daemon off;"],
            start_new_session=True))
        wait_http(f"http://127.0.0.1:{olah_port}/api/models/{REPO_ID}/revision/main")
        wait_http(f"{self.endpoint}/api/models/{REPO_ID}/revision/main")
        self.access_log = self.work / "access.log"
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(timeout=30)

    def requests(self) -> list[tuple[str, str, int, int]]:
        """Every request so far: method, path, status, body bytes."""
        out = []
        for line in self.access_log.read_text().splitlines():
            method, path, status, size = line.split(" ")
            out.append((method, path, int(status), int(size)))
        return out

    def downloads(self, name: str = "") -> list[tuple[str, str, int, int]]:
        """`resolve` requests (file downloads) that got through, for files ending in `name`."""
        return [r for r in self.requests() if "/resolve/" in r[1] and r[1].endswith(name) and r[2] < 400]


def serve(token: str, ready_file: Path) -> None:
    with Hub(token) as hub:
        # Blocked only now: children started earlier must not inherit a blocked SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        ready_file.write_text(json.dumps({"endpoint": hub.endpoint, "access_log": str(hub.access_log),
                                          "repo": str(repo_dir())}))
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--token", required=True)
    s.add_argument("--ready-file", required=True, type=Path)
    args = parser.parse_args()
    serve(args.token, args.ready_file)
