"""Real HTTP servers as upstreams, each answering with the path it routes on: nginx, Express and Tomcat.

They are the readers a path must mean the same thing to as it meant to the PDP. `make test` installs them
(tests/readers.mk): nginx and Tomcat from Debian by package name, Express pinned in tests/support/readers/.
Each runs as a child process on a free loopback port, started once per test module, stopped by its own PID.

- nginx, with its defaults (`merge_slashes on`): answers `$uri`, the decoded, normalised path its locations see.
- Express 5 with its default router: answers `req.path` (raw, as its router matches it) and the route matched.
- Tomcat 10.1 (the servlet container under Spring MVC): a JSP mapped to `/` answers servlet path + path info,
  the decoded, normalised path with path parameters dropped that servlet and Spring mappings see.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

REPO = Path(__file__).resolve().parents[2]
READERS = Path(__file__).resolve().parent / "readers"
TOMCAT_HOME = Path("/usr/share/tomcat10")
JDT_JAR = Path("/usr/share/java/eclipse-jdt-core.jar")  # the JSP compiler (a dependency of tomcat10-common)
START_TIMEOUT_S = 60.0  # Tomcat starts a JVM and compiles the JSP on the first request
STOP_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 5.0


class ReaderUnavailable(RuntimeError):
    """A reader is not installed: `make test` installs it (tests/readers.mk)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exchange(port: int, target: bytes, host: bytes = b"127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One GET of exactly `target` on a fresh connection: status, headers (lower-cased names, last wins), body."""
    data = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _unchunk(body)
    return status, headers, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def serving(server: Reader) -> Iterator[Reader]:
    """A module fixture's body: `server` started, yielded, stopped. Missing is a failure, never a skip: `make test`
    installs every reader."""
    try:
        server.start()
    except ReaderUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


class Reader(ABC):
    """One real server process. `routed(body)` is the path it routed on, as bytes."""

    name: str
    decodes: bool  # whether it routes on the percent-decoded path (nginx, Tomcat) or the raw one (Express)

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        """The command line and environment (None: inherited) for `self.port`."""

    @abstractmethod
    def seen(self) -> int:
        """How many requests (other than these counts) reached the server."""

    def expected(self, raw_path: str) -> bytes:
        """What the server must route on for a path it was sent, if it means what the PDP was asked about."""
        return unquote_to_bytes(raw_path) if self.decodes else raw_path.encode()

    @staticmethod
    def routed(body: bytes) -> bytes:
        return body.split(b"\n", 1)[0]

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv, env = self._argv()
        with (self.work / "output.log").open("ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up: {self._log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.seen()
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT_S} s: {self._log_tail()}")

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "output.log").read_text(errors="replace")[-2000:]
        return ""


class Nginx(Reader):
    name = "nginx"
    decodes = True

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(binary, os.X_OK):
            raise ReaderUnavailable("nginx is not installed; run `make test` (it installs it from the distribution)")
        conf = self.work / "nginx.conf"
        conf.write_text(
            f"""daemon off;
worker_processes 1;
pid {self.work}/nginx.pid;
error_log {self.work}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {self.work}/access.log;
    client_body_temp_path {self.work};
    proxy_temp_path {self.work};
    fastcgi_temp_path {self.work};
    uwsgi_temp_path {self.work};
    scgi_temp_path {self.work};
    server {{
        listen 127.0.0.1:{self.port};
        location / {{ default_type text/plain; return 200 "$uri\\n"; }}
    }}
}}
"""
        )
        return [binary, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "error.log")], None

    def seen(self) -> int:
        exchange(self.port, b"/__probe")  # nginx has no counter: its access log is read, less these probes
        lines = (self.work / "access.log").read_text(errors="replace").splitlines()
        return sum(1 for line in lines if '"GET /__probe ' not in line)


class Express(Reader):
    name = "express"
    decodes = False

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        node = shutil.which("node")
        if node is None or not (READERS / "node_modules" / "express").is_dir():
            raise ReaderUnavailable("Express is not installed in tests/support/readers; run `make test`")
        return [node, str(READERS / "express_reader.js"), str(self.port)], None

    def seen(self) -> int:
        status, _, body = exchange(self.port, b"/__seen")
        if status != 200:
            raise ValueError(status)
        return int(body)


class Tomcat(Reader):
    name = "tomcat"
    decodes = True

    def _argv(self) -> tuple[list[str], dict[str, str] | None]:
        catalina = TOMCAT_HOME / "bin" / "catalina.sh"
        if not catalina.is_file() or not JDT_JAR.is_file():
            raise ReaderUnavailable("Tomcat 10 is not installed (tomcat10-common); run `make test`")
        base = self.work
        for sub in ("conf", "lib", "logs", "temp", "work", "webapps/ROOT/WEB-INF"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (base / "lib" / JDT_JAR.name).symlink_to(JDT_JAR)
        (base / "conf" / "server.xml").write_text(
            f"""<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector address="127.0.0.1" port="{self.port}" protocol="HTTP/1.1" />
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false" />
    </Engine>
  </Service>
</Server>
"""
        )
        (base / "conf" / "web.xml").write_text(_WEB_XML.format(body=_JSP_SERVLET))
        (base / "webapps" / "ROOT" / "WEB-INF" / "web.xml").write_text(_WEB_XML.format(body=_ECHO_SERVLET))
        shutil.copyfile(READERS / "echo.jsp", base / "webapps" / "ROOT" / "echo.jsp")
        env = dict(os.environ)
        env.update(
            CATALINA_HOME=str(TOMCAT_HOME),
            CATALINA_BASE=str(base),
            CATALINA_PID=str(base / "tomcat.pid"),
            JAVA_OPTS="-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xss512k",
        )
        return [str(catalina), "run"], env  # catalina.sh `run` execs the JVM: the child's PID is Tomcat's

    def seen(self) -> int:
        status, _, body = exchange(self.port, b"/__seen")
        if status != 200:
            raise ValueError(status)
        return int(body.strip())


_WEB_XML = """<?xml version="1.0" encoding="UTF-8"?>
<web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="6.0">
{body}
</web-app>
"""
_JSP_SERVLET = """  <servlet>
    <servlet-name>jsp</servlet-name>
    <servlet-class>org.apache.jasper.servlet.JspServlet</servlet-class>
  </servlet>"""
_ECHO_SERVLET = """  <servlet>
    <servlet-name>echo</servlet-name>
    <jsp-file>/echo.jsp</jsp-file>
    <load-on-startup>1</load-on-startup>
  </servlet>
  <servlet-mapping>
    <servlet-name>echo</servlet-name>
    <url-pattern>/</url-pattern>
  </servlet-mapping>"""

KINDS: dict[str, type[Reader]] = {"nginx": Nginx, "express": Express, "tomcat": Tomcat}
