"""Batch and TensorDict key names shared by demonstration batches and RL rollouts.

One place for the names, so a data batch and a rollout speak the same language.
"""

OBS = "observation"  # (B, d_o) low-dimensional observation, raw environment units
GOAL = "goal"  # (B, d_g) goal, in the same space and units the environment gives at test time
ACTION = "action"  # (B, L, d_a) action chunk in raw units (or (B, d_a) for a single env step)
POINTCLOUD = "pointcloud"  # (B, N, 3) world-frame points in metres (point-cloud context), N fixed per dataset
