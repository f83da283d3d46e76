"""What a decoding worker runs in the fault tests (:mod:`tests.test_claims`): kept out of the test module so that a
worker imports nothing heavier than :mod:`soundnet.ingest.worker` itself, and starts as fast as a real one."""

from __future__ import annotations

import gc
import os
import struct
import time
from multiprocessing.connection import Connection
from pathlib import Path

from soundnet.ingest.config import IngestConfig
from soundnet.ingest.inputs import VideoInput
from soundnet.ingest.worker import Decoded, decode_input


def decode_or_fail(item: VideoInput) -> Decoded:
    """Decode ``item``, unless its key says otherwise: ``dies`` kills the worker halfway through sending the result
    (the pipe holds the start of a message that never ends), ``hangs`` never returns, ``once:MARKER`` kills the
    worker on the first try only (it creates the file MARKER)."""
    behaviour, _, marker = item.key.partition(":")
    if behaviour == "once" and not Path(marker).exists():
        Path(marker).touch()
        os._exit(9)
    if behaviour == "dies":
        conn = next(o for o in gc.get_objects() if isinstance(o, Connection))
        os.write(conn.fileno(), struct.pack("!i", 1 << 20) + b"the first bytes of a result")
        os._exit(9)
    if behaviour == "hangs":
        time.sleep(3600)
    return decode_input(item, IngestConfig())
