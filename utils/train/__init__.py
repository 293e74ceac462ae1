"""Layer 3, training: the engine shared by both stages (loop.py), the student (distill.py), the DDPM
teacher (teacher.py). Imports base, models and data; never utils/evaluate."""
