"""`ts.protocol.otf_message_handler`: where TorchServe's docs import streaming from."""

from ..handler_utils.utils import send_intermediate_predict_response

__all__ = ["send_intermediate_predict_response"]
