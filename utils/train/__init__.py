"""Training: the engine shared by both stages (loop.py), the student (distill.py), the DDPM teacher (teacher.py)."""
