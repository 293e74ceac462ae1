"""The base layer (utils/*.py): CLI plumbing (cli), the one user-error base class (errors), atomic
file writes (fileio), images on disk (images) and the tf.distribute strategy (strategy). These
modules import nothing of ours outside utils/*.py; every other layer may use them.

The subpackages are the top library layer, above models/ and data/: utils/train (the training
engine and its two stages) and utils/evaluate (sampling, FID, the digits classifier, export).
The layers and their allowed imports are checked by tests/test_layers.py.
"""
