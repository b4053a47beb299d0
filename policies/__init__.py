"""Policy models (VLA, Decision Transformer), their training, evaluation and control loop."""
