"""Training: configuration, loss, metrics and the training loop. Inference code never imports this."""
