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
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3_endpoint_and_region() -> tuple[str | None, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def s3_filesystem() -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and region, reused by every call."""
    return _s3_filesystem(*_s3_endpoint_and_region())


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
    # Created with 0o666 so the user's umask decides, as for any file a tool writes
    # (tempfile.mkstemp's 0600 kept a Label Studio running as another user out).
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    hidden and marker files included (callers decide: see ``is_hidden``). For short
    listings: a pool's prefix is walked with ``iter_files``."""
    files = list(iter_files(uri))
    if not files and not exists(uri):
        raise FileNotFoundError(f"nothing at {uri}")
    return files


def iter_files(uri: str, start_after: str | None = None):
    """Yield every file under a prefix (recursively; a file's own uri gives itself) as
    ``(uri, size)`` in uri order, one listing page (or local directory) at a time, so
    the whole listing is never in memory; with ``start_after`` (a uri), only the files
    after it. Hidden and marker files included."""
    if is_s3(uri):
        yield from _iter_s3(str(uri).rstrip("/"), start_after)
        return
    path = os.path.abspath(uri)
    if os.path.isfile(path):
        if start_after is None or path > start_after:
            yield path, os.path.getsize(path)
    elif os.path.isdir(path):
        yield from _walk_sorted(path, start_after)


def _walk_sorted(directory: str, start_after: str | None):
    # Entries in the order of their full paths (a directory sorts as "name/"), as S3
    # lists keys; directories wholly before ``start_after`` are not entered.
    with os.scandir(directory) as it:
        entries = sorted((e.name + "/" if e.is_dir() else e.name, e) for e in it)
    for _, entry in entries:
        if entry.is_dir():
            inside = entry.path + "/"
            if start_after is None or inside >= start_after or start_after.startswith(inside):
                yield from _walk_sorted(entry.path, start_after)
        elif entry.is_file() and (start_after is None or entry.path > start_after):
            yield entry.path, entry.stat().st_size


def _iter_s3(uri: str, start_after: str | None):
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    client = s3_client()
    if key:
        try:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as e:
            # Not one object (403 too: a role may list a prefix without reading its name as a key).
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
                raise
        else:
            if start_after is None or uri > start_after:
                yield uri, size
            return
    request = {"Bucket": bucket, "Prefix": key + "/" if key else ""}
    if start_after:
        request["StartAfter"] = _bucket_key(start_after)[1]
    try:
        for page in client.get_paginator("list_objects_v2").paginate(**request):
            for obj in page.get("Contents", ()):
                if not obj["Key"].endswith("/"):  # a zero-byte "directory" marker
                    yield f"s3://{bucket}/{obj['Key']}", obj["Size"]
    except ClientError as e:  # as pyarrow's filesystems say it: an OSError callers can catch
        code = e.response.get("Error", {}).get("Code")
        kind = FileNotFoundError if code == "NoSuchBucket" else PermissionError if code in ("403", "AccessDenied") \
            else OSError
        raise kind(f"listing {uri}: {e}") from None


def s3_client():
    """A boto3 S3 client for the same endpoint and region as ``s3_filesystem``."""
    return _s3_client(*_s3_endpoint_and_region())


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=region)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    return bucket, key


def put_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if nothing is there yet; False if something already was.
    Locally an exclusive create; on S3 a conditional PUT (If-None-Match: *)."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
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
