"""Training a generation: the models, the constraint losses, the training loop, embedding."""
