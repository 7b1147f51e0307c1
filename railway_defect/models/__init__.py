"""Models: the backbone factory and the LightningModule."""
