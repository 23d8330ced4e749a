"""`python -m frontend --port 8000 --tokenizer HOST:PORT --prefill HOST:PORT --decode HOST:PORT`
(add `--api-key KEY`, repeatable, or set API_KEYS=KEY1,KEY2 to require bearer keys).

One uvicorn worker: the in-flight count and the gRPC channels are per process. On SIGTERM
uvicorn stops accepting, lets open requests finish (up to --graceful-shutdown-s), then runs
the lifespan shutdown, which closes the channels.
"""

import gc
import logging
import sys

import uvicorn

from frontend.app import create_app
from frontend.config import parse_args
from services import tracing


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    tracing.configure("frontend", config.otlp_traces_endpoint)
    app = create_app(config)
    # What start-up made lives as long as the process: a full collection while serving (a
    # pause of every stream) skips it.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        workers=1,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.graceful_shutdown_s,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
