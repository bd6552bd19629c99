"""What a trained run means: eval, metrics, concepts, controls, plots, faithfulness and the
synthetic ground truth. Reads runs and stores; never trains."""
