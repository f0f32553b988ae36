"""Shared fixtures: one PostgreSQL server per session, a fresh database per test.

The session starts an embedded cluster in a temp dir under /tmp (or uses the server named
by ``AIRGATE_TEST_DATABASE_URL``), builds a template database with the migrations applied,
and clones it for every test that asks for `pg_dsn` or `db`, which is much faster than
migrating each time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio
import trio_asyncio

from store.cluster import EmbeddedCluster
from store.db import Database, open_database
from store.migrate import apply_migrations

TEMPLATE_DATABASE = "airgate_template"


def make_reachable_tmp_dir(prefix: str) -> Path:
    """A new directory under /tmp that an unprivileged postgres user can traverse.

    mkdtemp creates it 0700; as root the server runs as another user, so open up this
    directory (ours alone, never its parents).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class PgServer:
    """A server the tests may create and drop databases on."""

    admin_dsn: str
    template: str

    def dsn_for(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))

    def execute(self, *statements: str) -> None:
        """Run statements (CREATE/DROP DATABASE...) on the admin database."""

        async def run() -> None:
            async with (
                trio_asyncio.open_loop(),
                open_database(self.admin_dsn, min_size=1, max_size=1) as admin,
            ):
                for statement in statements:
                    await admin.execute(statement)

        trio.run(run)

    def create_database(self, name: str, template: str) -> str:
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _build_template(server: PgServer) -> None:
    server.drop_database(server.template)
    dsn = server.create_database(server.template, "template0")

    async def migrate() -> None:
        async with trio_asyncio.open_loop(), open_database(dsn, max_size=1) as database:
            await apply_migrations(database)

    trio.run(migrate)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    external = os.environ.get("AIRGATE_TEST_DATABASE_URL")
    if external:
        # A shared server may host several sessions at once: keep our template apart.
        server = PgServer(external, f"{TEMPLATE_DATABASE}_{uuid.uuid4().hex[:8]}")
        _build_template(server)
        try:
            yield server
        finally:
            server.drop_database(server.template)
        return
    root = make_reachable_tmp_dir("airgate-pg-")
    cluster = EmbeddedCluster(root / "data", fast=True)
    try:
        server = PgServer(cluster.start(), TEMPLATE_DATABASE)
        _build_template(server)
        yield server
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _private_database(server: PgServer, template: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = server.create_database(name, template)
    yield dsn
    try:
        server.drop_database(name)
    except Exception as exc:  # best effort: the server is discarded at session end anyway
        print(f"could not drop test database {name}: {exc!r}")


@pytest.fixture
def pg_dsn(pg_cluster: PgServer) -> Iterator[str]:
    """DSN of a fresh, migrated database private to this test."""
    yield from _private_database(pg_cluster, pg_cluster.template)


@pytest.fixture
def empty_pg_dsn(pg_cluster: PgServer) -> Iterator[str]:
    """DSN of a fresh database without any migrations, private to this test."""
    yield from _private_database(pg_cluster, "template0")


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Database]:
    """A `Database` on `pg_dsn`. The test runs in a task outside this fixture's
    ``open_loop`` block, so every test using it checks that a Database works there."""
    async with trio_asyncio.open_loop(), open_database(pg_dsn) as database:
        yield database
