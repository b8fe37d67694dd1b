"""`ts.handler_utils.utils`: send_intermediate_predict_response, TorchServe's streaming call."""

from __future__ import annotations

from typing import Any


def send_intermediate_predict_response(
    ret: list[Any], req_id_map: Any, message: str, code: int, context: Any
) -> bool:
    """Send `ret` (one answer per request of the batch) now, before `handle` returns.

    On a streamed request each call becomes one chunk of the HTTP/1.1 chunked answer.
    Kiln streams a TorchServe API's predictions when its handler's folder calls this
    function (kiln/config/torchserve.py); on other routes (or when the client asked for
    no stream) the intermediate answers are dropped and the final one is the answer.
    """
    send = getattr(context, "kiln_intermediate", None)
    if send is not None:
        send(ret, req_id_map, message, code)
    return True


__all__ = ["send_intermediate_predict_response"]
