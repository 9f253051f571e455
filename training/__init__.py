"""hrmedseg.training: feature distillation and fine-tuning (depends on the core, never on Qt)."""
