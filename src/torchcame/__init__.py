"""torchcame: the CAME optimizer (Luo et al., ACL 2023) for PyTorch."""

from .came import CAME
from .functional import came, init_state
from .step_in_backward import step_in_backward

__version__ = "0.1.0"

__all__ = ["CAME", "came", "init_state", "step_in_backward", "__version__"]
