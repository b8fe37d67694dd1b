"""`echo_stream`: TorchServe's streaming example as a generator handler.

TorchServe handlers call `send_intermediate_predict_response` for each
partial answer; in Kiln a `predict` that yields streams, one chunk per item
(kiln.yaml marks the API `streaming: true` so the TorchServe route streams
without the client asking). As TorchServe's echo_stream: three intermediate
responses "hello", then the final "hello world "; the seed's client joins the
chunks with " " and reads "hello hello hello hello world ".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


class EchoStream:
    def predict(self, payload: Any, context: Any) -> Iterator[str]:
        for _ in range(3):
            yield "hello"
            time.sleep(0.05)  # an intermediate result, like a token, then more work
        yield "hello world "
