"""The deployment wing: what a trained model costs and how it runs outside compaware.

Measurement (bench.py), the inference forms it times models in (forms.py), the clock that
times a compressor's candidate layers (timing.py), standalone files and compilers
(export.py), the trainable compressed model's file (model_file.py) and `compaware export`
(export_cli.py), BatchNorm folding (fold.py), the strided max-pool rewrite (pooling.py) and the
opt-in allocator setting (allocator.py). It knows nothing of training or of the compression
methods: those hand it models.
"""
