"""Coordinated activation maximization: the optimization, the concepts it picks and its image
prior."""
