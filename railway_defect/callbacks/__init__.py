"""Lightning callbacks: behaviour around training that is not part of the model."""
