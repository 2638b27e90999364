"""Evaluation of synthetic data: FID (fid), downstream classifiers (classifier), the
orchestration writing eval.json (evaluate) and the CLI command bodies (commands)."""
