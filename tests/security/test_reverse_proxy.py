"""The gateway behind a real nginx, configured as docs/security.md says: clients are told apart
by X-Forwarded-For from the trusted proxy (per-address limits hold per client, and a client's
own X-Forwarded-For cannot make it somebody else), same-origin pages still pass, and no token
reaches nginx's access log or the gateway's. Clients connect from 127.0.0.2 and 127.0.0.3 (any
127/8 address is loopback on Linux); nginx reaches the gateway from 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from relaybus.harness import freePort

pytestmark = [pytest.mark.processes]

SECRET = b"relaybus-reverse-proxy-secret-0123456789abcdef"

# The server block of docs/security.md, on plain HTTP and a free port.
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    log_format relaybus '$remote_addr [$time_local] "$request_method $uri" $status';
    server {{
        listen 127.0.0.1:{port};
        server_name gateway.example;
        access_log {dir}/access.log relaybus;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, folder: Path, upstream: int) -> None:
        self.folder, self.port = folder, freePort()
        (folder / "nginx.conf").write_text(NGINX_CONF.format(dir=folder, port=self.port,
                                                             upstream=upstream))
        self.process = subprocess.Popen(
            [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e",
             str(folder / "error.log"), "-g", "daemon off;"])
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start: "
                                       + (folder / "error.log").read_text()) from None
                time.sleep(0.1)

    @property
    def accessLog(self) -> str:
        return (self.folder / "access.log").read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
def proxied(tmp_path: Path, handlerPath: None, makeStack: Any) -> Iterator[Any]:
    if not Path(NGINX).exists():
        pytest.fail("these tests need nginx: apt-get install nginx-light (./dev test does)")
    (tmp_path / "secret").write_bytes(SECRET)
    stack = makeStack("memory", [
        "--trusted-proxy", "127.0.0.1", "--allowed-host", "gateway.example",
        "--jwt-secret-file", str(tmp_path / "secret"), "--max-connections-per-ip", "2",
        "--handlers", "whoami_handlers", "--handlers", "workers.examples"])
    (tmp_path / "nginx").mkdir()
    stack.nginx = nginx = Nginx(tmp_path / "nginx", stack.gateway.port)
    yield stack
    nginx.stop()


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, "HS256")


def fromAddress(proxied: Any, connect: Any, source: str, path: str = "/ws",
                **handshake: Any) -> Any:
    """A client whose TCP connection to nginx comes from `source`."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", proxied.nginx.port))
    return connect(f"ws://gateway.example:{proxied.nginx.port}{path}", sock=sock, **handshake)


def test_clients_behind_the_proxy_are_limited_each_by_their_own_address(
        proxied: Any, connect: Any) -> None:
    bearer = {"Authorization": f"Bearer {token('alice')}"}
    first = [fromAddress(proxied, connect, "127.0.0.2", additional_headers=bearer)
             for _ in range(2)]
    with pytest.raises(InvalidStatus) as caught:  # a spoofed X-Forwarded-For changes nothing
        fromAddress(proxied, connect, "127.0.0.2",
                    additional_headers={**bearer, "X-Forwarded-For": "192.0.2.77"})
    assert caught.value.response.status_code == 429
    other = fromAddress(proxied, connect, "127.0.0.3", additional_headers=bearer)
    assert other.call("whoami").data == {"principal": "alice"}
    assert first[0].call("echo", "through nginx").data == "through nginx"
    metrics = proxied.gateway.metrics()
    assert metrics['relaybus_handshakes_refused_total{reason="per_ip_connections"}'] == 1


def test_a_same_origin_page_behind_the_proxy_passes_and_a_foreign_one_does_not(
        proxied: Any, connect: Any) -> None:
    bearer = {"Authorization": f"Bearer {token('bob')}"}
    page = fromAddress(proxied, connect, "127.0.0.2", origin=f"http://gateway.example:"
                       f"{proxied.nginx.port}", additional_headers=bearer)
    assert page.call("whoami").data == {"principal": "bob"}
    with pytest.raises(InvalidStatus) as caught:
        fromAddress(proxied, connect, "127.0.0.3", origin="https://evil.example",
                    additional_headers=bearer)
    assert caught.value.response.status_code == 403


def test_a_query_token_reaches_neither_access_log(proxied: Any, connect: Any) -> None:
    secret = token("carol")
    client = fromAddress(proxied, connect, "127.0.0.2", path=f"/ws?access_token={secret}")
    assert client.call("whoami").data == {"principal": "carol"}
    client.close()
    time.sleep(0.2)  # nginx writes the access log line when the proxied connection ends
    assert '"GET /ws"' in proxied.nginx.accessLog
    assert secret not in proxied.nginx.accessLog
    assert secret not in proxied.gateway.log
