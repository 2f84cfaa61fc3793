"""A real S3 endpoint on loopback for the object-storage tests: moto's standalone server.

moto's ``ThreadedMotoServer`` serves the S3 HTTP API from memory on 127.0.0.1; s3fs and boto3 reach
it through ``AWS_ENDPOINT_URL`` like any S3-compatible store. The credentials are dummies (moto
accepts any); they are set in the environment so that spawned ranks and loader workers see them too.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextmanager
def s3_server() -> Iterator[str]:
    """Start the server, point the AWS environment at it, yield its endpoint URL; undo both after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_clients()


def make_bucket(name: str) -> None:
    """Create bucket ``name`` (boto3: s3fs's mkdir sends a location constraint moto refuses)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


def clear_clients() -> None:
    """Forget cached s3fs clients (they keep the endpoint and credentials they were made with)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
