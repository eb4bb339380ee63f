"""Stage 3: fine-tuning on real high-resolution images beside CNN baselines (to come)."""
