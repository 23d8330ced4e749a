"""A load generator's HTTP client: POSTs JSON and reads the server-sent events of the answer
over a fresh HTTP/1.1 connection per request, on asyncio streams alone.

The benchmark client shares the cores with the server it measures, so its own CPU time per
streamed chunk matters: this one reads a chunk in a fraction of the time an HTTP library's
layers take (httpx took about 450 us a chunk, 11% of a 2-core machine at 16 streams).
"""

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    """The server answered with a status other than 200."""


class SSEClient:
    def __init__(self, base_url: str, timeout_s: float = 600.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url!r}: the load generator speaks plain http://host:port")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s

    async def events(self, path: str, body: dict) -> AsyncIterator[str]:
        """The data of each `data:` line of the answer to POST `path` with JSON `body`.
        Raises HTTPStatusError (with the start of the body) for any status but 200."""
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                payload = json.dumps(body).encode()
                head = (
                    f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + payload)
                status, headers = await _read_head(reader)
                pieces = _body(reader, headers)
                if status != 200:
                    text = b"".join([piece async for piece in pieces])
                    raise HTTPStatusError(f"HTTP {status}: {text[:200].decode(errors='replace')}")
                pending = b""
                async for piece in pieces:
                    *lines, pending = (pending + piece).split(b"\n")
                    for line in lines:
                        if line.startswith(b"data:"):
                            yield line[5:].strip().decode()
            finally:
                writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection without an answer")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive: chunked, of a Content-Length, or up to the close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield (await reader.readexactly(size + 2))[:-2]  # the data, then CRLF
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(1 << 16):
            yield data
