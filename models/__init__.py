"""Layer 1, the models: per-dataset settings (configs), the U-Net (unet), the diffusion math
(diffusion) and weight import (weights). Imports only the base layer (utils/*.py) besides itself;
`python -m models.convert` is an entry point and sits on top of everything.
"""
