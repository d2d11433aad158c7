"""Triton kernels for the GPU ops (installed as rag_engine.kernels).

Readable GPU versions of topk_ip, fusion_softmax and rag_token_marg, and the
second GPU backend next to the CUDA extension. The launchers take torch
tensors that rag_engine.gpu has already checked; call the ops through
rag_engine.ops. They also run on CPU tensors under TRITON_INTERPRET=1
(how CI tests them).
"""

import os

# Triton fixes at decoration time whether a kernel is interpreted (numpy on
# CPU tensors) or compiled; remember which, for the device checks.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

from .fusion_softmax import MAX_D as FUSION_MAX_D  # noqa: E402
from .fusion_softmax import fusion_softmax  # noqa: E402
from .rag_token_marg import rag_token_marg  # noqa: E402
from .topk_ip import MAX_K as TOPK_IP_MAX_K  # noqa: E402
from .topk_ip import topk_ip_keys  # noqa: E402

__all__ = ["FUSION_MAX_D", "INTERPRETED", "TOPK_IP_MAX_K", "fusion_softmax", "rag_token_marg", "topk_ip_keys"]
