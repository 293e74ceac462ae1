"""Networks, per-dataset settings, diffusion math and weight import. Imports nothing of ours outside."""
