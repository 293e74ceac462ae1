"""Layer 3, evaluation: sampling the shipped or trained models, FID, the digits classifier, export.
Imports base, models and data; never utils/train."""
