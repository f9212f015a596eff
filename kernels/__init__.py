"""Loss and log-prob kernels of lightning-gspo: Triton on CUDA, PyTorch elsewhere.

Installed as ``lightning_gspo.kernels``. Imports only torch and triton, so it can be used without Lightning.
"""

from lightning_gspo.kernels.logprobs import selective_logprobs
from lightning_gspo.kernels.policy_loss import policy_loss

__all__ = ["policy_loss", "selective_logprobs"]
