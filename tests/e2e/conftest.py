"""Fixtures for the Postroom end-to-end tests.

Run: python3 -m pytest -n auto tests/e2e   (pip install -r tests/e2e/requirements.txt)
Binary: $POSTROOM_BIN, default <repo>/target/debug/postroom (build with `cargo build -p postroom`).

Each test gets its own server (own tmp dir, own data_dir, ports chosen by the kernel: port 0 on
127.0.0.1), so tests run in parallel under pytest-xdist.
"""

from __future__ import annotations

import os

import pytest

from helpers import BIN, Server

DEFAULT_TIMEOUT = 120

SAM = ("sam", "SamJones@example.test", "sam-secret-1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "soak: load and crash loops whose length POSTROOM_SOAK_* variables scale (short by default)",
    )


def pytest_collection_modifyitems(config, items):
    # Every test is bounded: 120 s unless the test sets its own timeout marker.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed:
        for srv in getattr(item, "postroom_servers", []):
            rep.sections.append((f"postroom {srv.name} stderr ({srv.stderr_path})", srv.stderr_text()))
    return rep


@pytest.fixture(scope="session", autouse=True)
def postroom_binary():
    """The server binary must exist before anything else is tried."""
    if not (BIN.is_file() and os.access(BIN, os.X_OK)):
        pytest.fail(
            f"postroom binary not found at {BIN}: run `cargo build -p postroom` first "
            f"or set POSTROOM_BIN to the binary to test",
            pytrace=False,
        )
    return BIN


@pytest.fixture
def make_server(tmp_path, request):
    """Factory: make_server(smtp={...}, pop3={...}, start=True) -> a running Server."""
    servers: list[Server] = []
    request.node.postroom_servers = servers

    def _make(start: bool = True, **overrides) -> Server:
        name = f"server{len(servers) + 1}" if servers else "server"
        srv = Server(tmp_path / name, overrides, name=name)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield _make
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(make_server) -> Server:
    """A running server with the default test configuration."""
    return make_server()


@pytest.fixture
def sam(server):
    """The server, with Sam enrolled (user sam, address SamJones@example.test)."""
    server.add_user(*SAM)
    return server
