"""Batch and TensorDict key names shared by demonstration batches and RL rollouts.

One place for the names, so a data batch and a rollout speak the same language.
"""

OBS = "observation"  # (B, d_o) low-dimensional observation, raw environment units
GOAL = "goal"  # (B, d_g) goal, in the same space and units the environment gives at test time
ACTION = "action"  # (B, L, d_a) action chunk in raw units (or (B, d_a) for a single env step)
POINTCLOUD = "pointcloud"  # (B, N, 3) world-frame points in metres (point-cloud context), N fixed per dataset
# (B, V, H, W, 3) uint8 RGB frames of V views (cameras x stacked frames), H x W pixels each (image context)
IMAGE = "image"
# (B, F) features of the clean point cloud by the frozen policy's own PointNet: how a TMRL agent on a
# point-cloud task sees the scene (a compact state; the replay buffer never holds the clouds)
CONTEXT_FEATURE = "context_feature"

# Transition keys of a TorchRL rollout (ChunkEnv) and of the demo chunks mixed into its replay batches;
# TorchRL's own names. Shapes are per transition batch of B high-level steps (chunks).
NEXT = "next"  # sub-TensorDict (B,) of what the step produced: next OBS/GOAL and the keys below
REWARD = "reward"  # (B, 1) float32, sum of the chunk's env rewards
TERMINATED = "terminated"  # (B, 1) bool, task success: the only thing that stops bootstrapping
TRUNCATED = "truncated"  # (B, 1) bool, time limit reached (bootstraps from the true final observation)
DONE = "done"  # (B, 1) bool, terminated | truncated: the episode is over
SUCCESS = "success"  # (B, 1) bool, the goal was reached during this chunk
ENV_STEPS = "env_steps"  # (B, 1) int64, real env steps this chunk ran (the discount exponent)
RESET = "_reset"  # (B, 1) bool, TorchRL's partial-reset mask: the sub-envs a collector asks to reset
