import os

import torch

# On a CPU-only machine the kernels run in Triton's interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
