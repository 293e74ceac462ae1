"""The weights formats, one module each, with the same small interface:

    NAME                               the format's name (Weights.format, --format)
    recognise(path) -> bool            whether `path` is a file or folder of this format
    read(path, cfg, ema) -> Weights    its tensors under official DDPM names
    locate(folder, cfg, role) -> list  where its files would be inside a folder, for a "student"
                                       (eval.py --model_dir) or a "teacher" (training.py's search)
    write(folder, model, meta) -> list where it exists: the model's weights in this format

models/weights.py is the only caller: add a format here and every entry point knows it.
"""
from models.formats import converted, ddim_pth, ddpm_tf1, diffusers, original_h5

# In order of recognition: a folder is ours before it is a diffusers folder or a TF checkpoint.
FORMATS = {m.NAME: m for m in (converted, diffusers, ddpm_tf1, original_h5, ddim_pth)}
WRITABLE = tuple(name for name, m in FORMATS.items() if hasattr(m, "write"))
