"""Security against a real Buildbot 4.3.0 master: TLS (a ``tls:`` connection string with a
custom trust root, and ``--use-tls`` with the platform trust store pointed at a test CA), the
HTTP CONNECT proxy option through a small loopback proxy, credentials (tac 0600, the password
in no log, command line or environment of the worker and its executors), create-worker's
refusal of an unsafe basedir, and ``--log-format json``.

Certificates are made at test time with ``cryptography`` (a dependency of pyOpenSSL, which
``twisted[tls]`` brings in); the master listens on an ``ssl:`` endpoint.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import select
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MasterFactory
from realmaster import RealMaster, WorkerProcess, descendants, wait_for

QUICK = "[steps.ShellCommand(command=['echo', 'hello over a safe channel'])]"
SLOW = "[steps.ShellCommand(command=['sh', '-c', 'sleep 3; echo done'])]"
PASSWORD = "Pw-s3cret-4f9c2e"


# ---------------------------------------------------------------------------------------
# certificates


@dataclass
class Pki:
    ca_dir: Path  # a directory with only the CA's certificate (trustRoots=)
    ca_file: Path
    key: Path  # the master's private key
    cert: Path  # the master's certificate (for 127.0.0.1 and localhost)


def _make_pki(where: Path, cn: str) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    where.mkdir(parents=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(cn))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_dir = where / "trust"
    ca_dir.mkdir()
    ca_file = ca_dir / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    key_file = where / "key.pem"
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    cert_file = where / "cert.pem"
    cert_file.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    return Pki(ca_dir, ca_file, key_file, cert_file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    """The master's PKI, and an unrelated CA (a wrong trust root)."""
    base = tmp_path_factory.mktemp("pki")
    return _make_pki(base / "good", "pyworker test CA"), _make_pki(base / "other", "other CA")


def tls_master_config(p: Pki) -> str:
    """extra_config turning the master's PB port (tcp:P:interface=...) into ssl:P:..."""
    return (
        "c['protocols']['pb']['port'] = (c['protocols']['pb']['port'].replace('tcp:', 'ssl:', 1)"
        f" + ':privateKey={p.key}:certKey={p.cert}')\n"
    )


def tls_string(master: RealMaster, trust: Path) -> str:
    return f"--connection-string=tls:host=127.0.0.1:port={master.pb_port}:trustRoots={trust}"


def read_log(worker: WorkerProcess) -> str:
    try:
        return worker.twistd_log.read_text(errors="replace")
    except OSError:
        return ""


def assert_keeps_retrying(master: RealMaster, worker: WorkerProcess, marker: str) -> str:
    """The worker stays up, never gets connected, logs ``marker`` and tries again."""
    log = wait_for(
        lambda: (lambda t: t if t.count(marker) >= 2 else None)(read_log(worker)),
        30,
        f"two {marker!r} in the worker's log",
        worker.logs,
    )
    assert worker.running(), worker.logs()
    assert not master.is_worker_connected(worker.name)
    return log


# ---------------------------------------------------------------------------------------
# TLS


def test_tls_connection_string_with_custom_trust_root(
    make_master: MasterFactory, pyworker_executable: str, pki: tuple[Pki, Pki]
) -> None:
    good, other = pki
    master = make_master(
        {"q": QUICK}, workers=("tls", "wrong"), extra_config=tls_master_config(good)
    )
    worker = master.start_worker(
        pyworker_executable, "tls", create_args=[tls_string(master, good.ca_dir)]
    )
    build = master.force_build("q")
    assert build.result == "SUCCESS", build.describe()
    assert "hello over a safe channel" in build.step("shell").stream()
    assert (
        "connection_string = 'tls:host=127.0.0.1" in (worker.basedir / "buildbot.tac").read_text()
    )

    # a worker that does not trust the master's certificate never logs in, and retries
    wrong = master.start_worker(
        pyworker_executable, "wrong", create_args=[tls_string(master, other.ca_dir)], wait=False
    )
    log = assert_keeps_retrying(master, wrong, "certificate verify failed")
    assert PASSWORD not in log


def test_use_tls_with_the_platform_trust_store(
    make_master: MasterFactory, pyworker_executable: str, pki: tuple[Pki, Pki]
) -> None:
    """``--use-tls``: tls:host=<master>, verified against OpenSSL's default paths, which
    ``SSL_CERT_FILE`` points at the test CA here."""
    good, _ = pki
    master = make_master({"q": QUICK}, extra_config=tls_master_config(good))
    env = {"SSL_CERT_FILE": str(good.ca_file), "SSL_CERT_DIR": str(good.ca_dir)}
    if os.environ.get("PYWORKER_IO"):
        env["PYWORKER_IO"] = os.environ["PYWORKER_IO"]
    worker = master.start_worker(pyworker_executable, create_args=["--use-tls"], env=env)
    assert "use_tls = 1\n" in (worker.basedir / "buildbot.tac").read_text()
    build = master.force_build("q")
    assert build.result == "SUCCESS", build.describe()


# ---------------------------------------------------------------------------------------
# HTTP CONNECT proxy


class ConnectProxy:
    """A loopback HTTP CONNECT proxy in threads, bounded: 127.0.0.1 targets only, at most
    ``max_connections`` tunnels, 64 KiB of request head. ``refuse``: answer 403 instead."""

    def __init__(self, refuse: bool = False, max_connections: int = 32) -> None:
        self.refuse = refuse
        self.max_connections = max_connections
        self.requests: list[bytes] = []
        self.tunnels = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port: int = self.listener.getsockname()[1]
        self._spawn(self._accept_loop)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or len(self.requests) >= self.max_connections:
                    conn.close()
                    continue
                self._sockets.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
        except OSError:
            conn.close()
            return
        request, _, early = head.partition(b"\r\n\r\n")
        with self._lock:
            self.requests.append(head)
        parts = request.split(b" ")
        host, _, port = (parts[1] if len(parts) == 3 else b"").rpartition(b":")
        if self.refuse or parts[0] != b"CONNECT" or host != b"127.0.0.1" or not port.isdigit():
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            conn.close()
            return
        with self._lock:
            self._sockets.append(upstream)
            self.tunnels += 1
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if early:
            upstream.sendall(early)
        self._relay(conn, upstream)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            s.settimeout(None)
        peers = {a: b, b: a}
        try:
            while not self._closed:
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = [self.listener, *self._sockets]
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def proxies() -> Iterator[list[ConnectProxy]]:
    made: list[ConnectProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def test_http_connect_proxy(
    make_master: MasterFactory, pyworker_executable: str, proxies: list[ConnectProxy]
) -> None:
    proxy = ConnectProxy()
    proxies.append(proxy)
    master = make_master({"q": QUICK})
    master.start_worker(
        pyworker_executable,
        create_args=[f"--proxy-connection-string=tcp:host=127.0.0.1:port={proxy.port}"],
    )
    assert proxy.requests[0] == f"CONNECT 127.0.0.1:{master.pb_port} HTTP/1.1\r\n\r\n".encode()
    assert proxy.tunnels == 1
    build = master.force_build("q")
    assert build.result == "SUCCESS", build.describe()
    assert "hello over a safe channel" in build.step("shell").stream()


def test_http_connect_proxy_refusal_is_retried(
    make_master: MasterFactory, pyworker_executable: str, proxies: list[ConnectProxy]
) -> None:
    proxy = ConnectProxy(refuse=True)
    proxies.append(proxy)
    master = make_master({"q": QUICK})
    worker = master.start_worker(
        pyworker_executable,
        create_args=[f"--proxy-connection-string=tcp:host=127.0.0.1:port={proxy.port}"],
        wait=False,
    )
    wait_for(lambda: len(proxy.requests) >= 2, 30, "two CONNECT attempts", worker.logs)
    assert worker.running(), worker.logs()
    assert not master.is_worker_connected("w1")
    assert set(proxy.requests) == {f"CONNECT 127.0.0.1:{master.pb_port} HTTP/1.1\r\n\r\n".encode()}
    assert "403" in read_log(worker)
    # once the proxy lets it through, the same worker process connects and builds
    proxy.refuse = False
    master.wait_worker_connected("w1", timeout=60)
    build = master.force_build("q")
    assert build.result == "SUCCESS", build.describe()


# ---------------------------------------------------------------------------------------
# credentials and logs


def test_password_stays_secret_and_json_log(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"slow": SLOW}, workers=("w1", "intruder"), password=PASSWORD)
    worker = master.start_worker(pyworker_executable, create_args=["--log-format=json"])
    tac = worker.basedir / "buildbot.tac"
    assert stat.S_IMODE(tac.stat().st_mode) == 0o600
    assert PASSWORD in tac.read_text()

    request = master.request_build("slow")
    master.wait_build_started(request, step="shell")
    procs = wait_for(
        lambda: (lambda p: p if any("sleep 3" in x.cmdline for x in p) else None)(
            descendants(worker.pid)
        ),
        15,
        "the build's command to run",
        worker.logs,
    )
    for proc in [*procs, *[p for p in descendants() if p.pid == worker.pid]]:
        for what in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{proc.pid}/{what}").read_bytes()
            except OSError:
                continue  # gone meanwhile
            assert PASSWORD.encode() not in data, f"password in /proc/{proc.pid}/{what}: {proc}"
    assert len(procs) >= 2  # executors and the command itself were looked at
    build = master.wait_build(request)
    assert build.result == "SUCCESS", build.describe()

    # a worker with a wrong password: refused, and neither password gets logged
    wrong = "Wr0ng-" + PASSWORD[::-1]
    intruder = start_intruder(master, pyworker_executable, wrong)
    wait_for(
        lambda: "unauthorized login" in read_log(intruder) or not intruder.running(),
        30,
        "the intruder's login to fail",
        intruder.logs,
    )
    assert wrong not in read_log(intruder) and PASSWORD not in read_log(intruder)
    assert wrong not in intruder.console_log.read_text(errors="replace")
    assert not master.is_worker_connected("intruder")

    master.stop_worker(worker)
    text = worker.twistd_log.read_text()
    assert PASSWORD not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "message"} <= set(r) for r in records)
    assert all(datetime.datetime.fromisoformat(r["time"]).tzinfo for r in records)
    assert any(r["message"] == "message from master: attached" for r in records), text[-3000:]


def start_intruder(master: RealMaster, executable: str, password: str) -> WorkerProcess:
    """Worker ``intruder`` (known to the master) with the wrong ``password``."""
    intruder = WorkerProcess(
        executable,
        master.workers_dir / "intruder",
        "intruder",
        password,
        f"127.0.0.1:{master.pb_port}",
    )
    intruder.create()
    intruder.start()
    master.worker_procs.append(intruder)
    return intruder


def test_wrong_password_is_refused_and_retried(
    make_master: MasterFactory, worker_executable: str
) -> None:
    """As the reference (PROTOCOL.md 1.3): UnauthorizedLogin -> log, back off, retry."""
    master = make_master({"q": QUICK}, workers=("intruder",), password=PASSWORD)
    intruder = start_intruder(master, worker_executable, "not-" + PASSWORD)
    log = assert_keeps_retrying(master, intruder, "unauthorized login; check worker name")
    assert PASSWORD not in log


def test_create_worker_refuses_unsafe_basedir(pyworker_executable: str, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    def create(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [pyworker_executable, "create-worker", *args, "127.0.0.1:9989", "w", PASSWORD]
        return subprocess.run(argv, capture_output=True, text=True, env={}, timeout=60)

    for basedir, named in ((shared, shared), (shared / "new", shared)):
        result = create(str(basedir))
        assert result.returncode == 1
        assert f"chmod go-w {named}" in result.stderr and "--force" in result.stderr
        assert PASSWORD not in result.stdout + result.stderr
        assert not (shared / "buildbot.tac").exists() and not (shared / "new").exists()
    result = create("-q", "--force", str(shared))
    assert result.returncode == 0, result.stdout + result.stderr
    assert stat.S_IMODE((shared / "buildbot.tac").stat().st_mode) == 0o600
    shared.chmod(0o755)
    result = create("-q", str(shared / "now-safe"))
    assert result.returncode == 0, result.stdout + result.stderr
