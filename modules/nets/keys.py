"""Batch and TensorDict key names shared by demonstration batches and RL rollouts.

One place for the names, so a data batch and a rollout speak the same language.
"""

OBS = "observation"  # (B, d_o) low-dimensional observation, raw environment units
GOAL = "goal"  # (B, d_g) goal, in the same space and units the environment gives at test time
ACTION = "action"  # (B, L, d_a) action chunk in raw units (or (B, d_a) for a single env step)
POINTCLOUD = "pointcloud"  # (B, N, 3) world-frame points in metres (point-cloud context), N fixed per dataset
# (B, F) features of the clean point cloud by the frozen policy's own PointNet: how a TMRL agent on a
# point-cloud task sees the scene (a compact state; the replay buffer never holds the clouds)
CONTEXT_FEATURE = "context_feature"
