"""A PyTorch Lightning project template: `python -m project.run --help`."""
