"""The trainer: fine-tuning jobs from the durable consumer ``trainers``."""
