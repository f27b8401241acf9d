"""Deployment: the forms a trained model runs in, and the clocks that time them."""
