"""``tempest web``, run as a real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ..conftest import free_port
from ..test_cli import one_error_line
from ..test_signals import clean_env
from .conftest import need_web

pytestmark = pytest.mark.timeout(60)

APP = """\
from tempest import Engine
from tempest.queues import SQLiteQueue

class WebApp(Engine):
    class configure:
        queue = SQLiteQueue({path!r})
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A folder with webapp.py: an engine on a SQLite queue in that folder."""
    (tmp_path / "webapp.py").write_text(APP.format(path=str(tmp_path / "queue.db")))
    return tmp_path


def tempest(app_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tempest ARGS`` in *app_dir*, to its end."""
    return subprocess.run([sys.executable, "-m", "tempest", *args], cwd=app_dir,
                          env=clean_env(**env), capture_output=True, text=True, timeout=30,
                          check=False)




@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_a_host_other_machines_reach_needs_auth(app_dir, host):
    """A non-loopback --host without --auth: one error line, exit 2, nothing bound."""
    done = tempest(app_dir, "web", "webapp:WebApp", "--host", host, "--port", str(free_port()))
    assert done.returncode == 2
    line = one_error_line(done)
    assert f"--host {host}" in line and "--auth" in line and "TEMPEST_WEB_AUTH" in line


@pytest.mark.parametrize("auth", ["admin", "admin:", ":pw"])
def test_auth_must_be_user_colon_password(app_dir, auth):
    """--auth and TEMPEST_WEB_AUTH take user:password: anything else is exit 2."""
    done = tempest(app_dir, "web", "webapp:WebApp", "--auth", auth)
    assert done.returncode == 2 and "--auth: auth must be 'user:password'" in \
        one_error_line(done)
    done = tempest(app_dir, "web", "webapp:WebApp", TEMPEST_WEB_AUTH=auth)
    assert done.returncode == 2 and "TEMPEST_WEB_AUTH: auth must be" in one_error_line(done)


def test_bad_port_and_bad_target(app_dir):
    """A port out of range is exit 2; a module that is missing is exit 3."""
    done = tempest(app_dir, "web", "webapp:WebApp", "--port", "70000")
    assert done.returncode == 2 and "port number" in one_error_line(done)
    done = tempest(app_dir, "web", "nowhere:WebApp")
    assert done.returncode == 3 and "cannot import 'nowhere'" in one_error_line(done)


def test_a_port_in_use_is_one_line(app_dir):
    """A port that cannot be listened on: one line, exit 4."""
    need_web()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = tempest(app_dir, "web", "webapp:WebApp", "--port", str(port))
    assert done.returncode == 4
    assert f"cannot listen on 127.0.0.1:{port}" in one_error_line(done)


def serving(app_dir: Path, *args: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``tempest web``; the process and its base URL once it listens."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tempest", "web", "webapp:WebApp", "--port", str(port), *args],
        cwd=app_dir, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # printed once the socket listens
    assert line.startswith("tempest web: the WebApp dashboard on http://127.0.0.1:"), (
        line, process.stderr.read() if process.poll() is not None else "")
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen[str], signum: int) -> int:
    process.send_signal(signum)
    try:
        return process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_the_dashboard_until_stopped(app_dir, signum):
    """It serves the pages on 127.0.0.1 and exits 0 on SIGTERM or SIGINT."""
    need_web()
    process, base = serving(app_dir)
    try:
        with urllib.request.urlopen(base + "/failed", timeout=10) as response:
            page = response.read().decode()
        assert response.status == 200 and "WebApp" in page and "Retry all" in page
    finally:
        code = stop(process, signum)
    assert code == 0, process.stderr.read() if process.stderr else ""


def test_read_only_and_auth_from_the_environment(app_dir):
    """--read-only shows no action; TEMPEST_WEB_AUTH asks every request for a password."""
    need_web()
    process, base = serving(app_dir, "--read-only", TEMPEST_WEB_AUTH="admin:s3cret")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            base + "/failed", headers={"Authorization": "Basic YWRtaW46czNjcmV0"})
        with urllib.request.urlopen(request, timeout=10) as response:
            page = response.read().decode()
        assert "read-only" in page and "Retry all" not in page
    finally:
        assert stop(process, signal.SIGTERM) == 0


def test_allowed_host_lets_a_proxys_name_in(app_dir):
    """Without --auth only loopback Host names are answered; --allowed-host adds one."""
    need_web()
    process, base = serving(app_dir, "--allowed-host", "dash.example")
    try:
        def status(host: str) -> int:
            request = urllib.request.Request(base + "/", headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert status("dash.example") == 200
        assert status("other.example") == 400
    finally:
        assert stop(process, signal.SIGTERM) == 0
