"""Model code: plain policy networks (``modules.nets``) and the training wrappers around them."""
