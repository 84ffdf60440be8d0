"""Plain ``nn.Module`` policy networks: the CSP policy, its context modes, transformer, encoders, schedule.

Imports neither Lightning, TorchRL nor MLflow, so a fine-tuning job or a robot can load a policy
with torch alone.
"""

from modules.nets import keys
from modules.nets.contexts import CONTEXTS
from modules.nets.encoders import ENCODERS
from modules.nets.policy import CSPPolicy, PolicyConfig
from modules.nets.schedule import SCHEDULES

__all__ = ["CONTEXTS", "CSPPolicy", "ENCODERS", "PolicyConfig", "SCHEDULES", "keys"]
