"""The fine-tuning methods and the high-level action layout each gives its decoder (light: no torch), so
configs can be validated without importing TorchRL."""

from __future__ import annotations

from typing import Any

# The high-level action layout per method; None = raw environment actions, no base policy.
METHODS: dict[str, dict[str, Any] | None] = {
    "tmrl": {"heads": ["z", "sigma", "eps_c"]},
    "fixed_sigma": {"heads": ["z", "eps_c"]},  # the ablation: sigma fixed at decoder_kw's fixed_sigma
    "dsrl": {"heads": ["z"], "fixed_sigma": 0.0},  # CSP at sigma = 0 is plain BC: steer the noise only
    "sac": None,
    "rlpd": None,  # sac + replay batches half from the demonstrations (app/finetune.py)
}
