"""The universal SAE and its training: the model, the objective seam, the step and its
kernels, the trainer, the run folder, checkpoints, extension and the paper's checkpoints."""
