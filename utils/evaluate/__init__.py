"""Evaluation: sampling the shipped or trained models, FID, the digits classifier, export."""
