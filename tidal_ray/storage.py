"""Where bytes live: local paths and ``s3://bucket/prefix`` URIs behind one small API.

S3 is configured the AWS way only (credential chain, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for S3-compatible endpoints). Nothing here logs or echoes
credentials. Writes are atomic: write-then-rename locally, one PUT on S3.
"""
from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and region, reused by every call."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_filesystem(endpoint, region)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs = {"region": region}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_parquet(uri: str, table: pa.Table) -> None:
    write_bytes(uri, parquet_bytes(table))


def read_parquet(uri: str) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs)


def is_hidden(uri: str) -> bool:
    """A marker or hidden file (``_SUCCESS``, ``.DS_Store``, ``_metadata``, a temp file)."""
    return os.path.basename(str(uri).rstrip("/")).startswith((".", "_"))


def list_files(uri: str) -> list[tuple[str, int]]:
    """Every file under a prefix (recursively), as ``(uri, size)``, sorted by uri;
    hidden and marker files included (callers decide: see ``is_hidden``)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(str(uri), info.size)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        (prefix + f.path, f.size) for f in files
        if f.type == pafs.FileType.File
    )


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    return bucket, key


def put_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if nothing is there yet; False if something already was.
    Locally an exclusive create; on S3 a conditional PUT (If-None-Match: *)."""
    if is_s3(uri):
        import boto3
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        try:
            boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise
        return True
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
