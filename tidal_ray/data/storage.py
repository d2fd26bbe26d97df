"""Where bytes live: local paths and ``s3://bucket/prefix`` URIs behind one small API.

S3 is configured the AWS way only (credential chain, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for S3-compatible endpoints). Nothing here logs or echoes
credentials. Writes are atomic: write-then-rename locally, one PUT on S3.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tidal_ray.errors import BadInput


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


DEFAULT_MAX_ATTEMPTS = 10  # AWS's own default is 3 (standard mode): too few for a day-long campaign
_retries = {"boto3": 0}    # retries botocore made in this process (pyarrow's are not exposed)


def max_attempts() -> int:
    """Attempts per S3 request, retries included: ``AWS_MAX_ATTEMPTS`` as the AWS SDKs read it."""
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)


def s3_retries() -> int:
    """How many S3 requests botocore retried in this process so far."""
    return _retries["boto3"]


def _s3_endpoint_and_region() -> tuple[str | None, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def s3_filesystem() -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and region, reused by every call."""
    return _s3_filesystem(*_s3_endpoint_and_region(), max_attempts())


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str, attempts: int) -> pafs.S3FileSystem:
    # Throttling (503 SlowDown), 5xx and dropped connections are retried with backoff.
    kwargs = {"region": region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


CONFIGURE = ("configure AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), AWS_REGION, "
             "and AWS_ENDPOINT_URL for S3-compatible storage")
_DENIED = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ACCESS_DENIED", "HTTP status 403")
_EXPIRED = ("ExpiredToken", "RequestExpired", "TokenRefreshRequired", "EXPIRED_TOKEN")


def access_problem(error: BaseException, uri: str) -> str | None:
    """The one line for a credentials or permission error on ``uri`` (botocore's or
    pyarrow's), naming the URI and what to configure, never a secret; None for any other
    error. The code is matched, never the message echoed: it could hold a key id."""
    try:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError
    except ImportError:  # pyarrow's S3 without boto3: only its OSErrors can come
        ClientError = NoCredentialsError = PartialCredentialsError = type("_Never", (Exception,), {})
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return f"{uri}: no AWS credentials found; {CONFIGURE}"
    code = error.response.get("Error", {}).get("Code", "") if isinstance(error, ClientError) else \
        str(error) if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) else ""
    if any(name in code for name in _EXPIRED):
        return f"{uri}: the AWS credentials have expired; renew them (e.g. aws sso login) or {CONFIGURE}"
    if any(name in code for name in _DENIED):
        return f"{uri}: access denied (403) with the AWS credentials in use; grant them access to it or {CONFIGURE}"
    return None


@contextlib.contextmanager
def s3_access(uri: str):
    """Turn a credentials or permission error on an ``s3://`` URI into BadInput (exit 2)."""
    try:
        yield
    except Exception as e:
        line = access_problem(e, uri) if is_s3(uri) else None
        if line is None:
            raise
        raise BadInput(line) from None


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
    with s3_access(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with s3_access(uri), fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if is_s3(uri):
        with s3_access(uri), fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.replace(_temp_beside(path, data), path)


def _temp_beside(path: str, data: bytes) -> str:
    """``data`` in a new hidden file next to ``path``, to be renamed or linked into place.
    Created with 0o666 so the user's umask decides, as for any file a tool writes
    (tempfile.mkstemp's 0600 kept a Label Studio running as another user out)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


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
    with s3_access(uri):
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


def iter_files(uri: str, start_after: str | None = None, last: str | None = None):
    """Yield every file under a prefix (recursively; a file's own uri gives itself) as
    ``(uri, size)`` in uri order, one listing page (or local directory) at a time, so
    the whole listing is never in memory; with ``start_after`` and ``last`` (uris), only
    the files after the one and up to the other. Hidden and marker files included."""
    if is_s3(uri):
        with s3_access(uri):
            for file in _iter_s3(str(uri).rstrip("/"), start_after):
                if last is not None and file[0] > last:
                    return
                yield file
        return
    path = os.path.abspath(uri)
    if os.path.isfile(path):
        if (start_after is None or path > start_after) and (last is None or path <= last):
            yield path, os.path.getsize(path)
    elif os.path.isdir(path):
        yield from _walk_sorted(path, start_after, last)


def _walk_sorted(directory: str, start_after: str | None, last: str | None):
    # Entries in the order of their full paths (a directory sorts as "name/"), as S3
    # lists keys. A directory has no order to seek in, so each call reads all of its
    # entries; only those inside the window are sorted and stat'ed (a run of 64 files
    # in a directory of 300,000: 0.09 s rather than 0.4 s), as names alone (a whole
    # directory of them is held while it is walked), and directories wholly outside the
    # window are not entered.
    def inside_window(path: str, is_dir: bool) -> bool:
        if is_dir:
            inside = path + "/"
            return (start_after is None or inside >= start_after or start_after.startswith(inside)) \
                and (last is None or inside <= last)
        return (start_after is None or path > start_after) and (last is None or path <= last)

    with os.scandir(directory) as it:
        names = sorted(e.name + "/" if e.is_dir() else e.name for e in it
                       if (e.is_dir() or e.is_file()) and inside_window(e.path, e.is_dir()))
    for name in names:
        path = os.path.join(directory, name.rstrip("/"))
        if name.endswith("/"):
            yield from _walk_sorted(path, start_after, last)
        else:
            yield path, os.path.getsize(path)


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
        if access_problem(e, uri):
            raise
        kind = FileNotFoundError if e.response.get("Error", {}).get("Code") == "NoSuchBucket" else OSError
        raise kind(f"listing {uri}: {e}") from None


def s3_client():
    """A boto3 S3 client for the same endpoint and region as ``s3_filesystem``."""
    return _s3_client(*_s3_endpoint_and_region(), max_attempts(), os.environ.get("AWS_RETRY_MODE") or "standard")


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str, attempts: int, mode: str):
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                          config=Config(retries={"mode": mode, "max_attempts": attempts}))
    client.meta.events.register("after-call.s3", _count_retries)
    return client


def _count_retries(http_response=None, parsed=None, **_) -> None:
    _retries["boto3"] += int((parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0))


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    return bucket, key


def put_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if nothing is there yet; False if something already was.
    Locally an exclusive create (a reader never sees it half written); on S3 a
    conditional PUT (If-None-Match: *)."""
    if is_s3(uri):
        return put_conditional(uri, data, None) is not None
    path = os.path.abspath(uri)
    tmp = _temp_beside(path, data)
    try:
        os.link(tmp, path)  # like O_EXCL, fails if the name exists; the file appears whole
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def read_with_etag(uri: str) -> tuple[bytes, str] | None:
    """An S3 object's bytes and its ETag (the version a conditional PUT compares), or None."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return response["Body"].read(), response["ETag"]


def put_conditional(uri: str, data: bytes, etag: str | None) -> str | None:
    """A compare-and-swap PUT on S3: create (``etag`` None: If-None-Match: *) or replace
    the version ``etag`` (If-Match); returns the new ETag, or None if the object was
    not in the state expected (someone else wrote first)."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        with s3_access(uri):
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except ClientError as e:
        # 409 ConditionalRequestConflict: a concurrent conditional write to the key won.
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412",
                                                       "409", "NoSuchKey"):
            return None
        raise


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        with s3_access(uri):
            fs.delete_file(path)
    except FileNotFoundError:
        pass
