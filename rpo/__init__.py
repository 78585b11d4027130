"""rpo: Iterative Reasoning Preference Optimization and CoT-Self-Instruct in JAX."""
