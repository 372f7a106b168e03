"""Knowledge-distillation fine-tuning."""
