"""TorchServe's `ts` package as handlers import it, for handlers served by Kiln unchanged.

Served to workers by `kiln.compat.shims` only when no real `ts` (the `torchserve`
distribution) is importable. It holds what handler code imports, not the server:

- `ts.torch_handler.base_handler.BaseHandler` (initialize / preprocess / inference /
  postprocess / handle / explain_handle / describe_handle)
- `ts.context.Context` (the `context` handlers receive)
- `ts.protocol.otf_message_handler.send_intermediate_predict_response` and its current
  home `ts.handler_utils.utils`
- `ts.utils.util.PredictionException` and the label helpers handlers use

The `torchserve:` runtime (kiln/handlers/torchserve_handler.py) calls the handler.
"""

__version__ = "0.0.0+kiln"
