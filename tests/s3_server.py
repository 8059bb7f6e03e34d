"""A real S3 protocol server on loopback for tests: moto's ``ThreadedMotoServer`` on 127.0.0.1.

Use it from a test module either as fixtures::

    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

    @pytest.mark.s3
    def test_x(s3_bucket, s3_server):
        fs_url = f"{s3_bucket}/prefix"; opts = s3_server.storage_options()

or as a context manager outside pytest (``with moto_s3_server() as server: ...``).

The fixtures set the AWS environment (dummy credentials, no instance-metadata lookups, no user
config files) only while they are active, through ``pytest.MonkeyPatch``; nothing leaves the
loopback interface. The server is stopped when the module's tests are done.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance-metadata endpoint
    "AWS_CONFIG_FILE": "/dev/null",  # ignore the user's ~/.aws
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
AWS_ENV_UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@dataclass
class S3Server:
    """A running moto S3 server: its endpoint and helpers to talk to it."""

    endpoint_url: str

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage_options for this server (explicit credentials and endpoint)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its ``s3://`` URL."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """Start moto's threaded S3 server on 127.0.0.1 (a free port) and stop it on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for one test module, with the AWS environment set only meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        for key in AWS_ENV_UNSET:
            mp.delenv(key, raising=False)
        with moto_s3_server() as server:
            yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the module's server, as an ``s3://`` URL."""
    return s3_server.make_bucket()
