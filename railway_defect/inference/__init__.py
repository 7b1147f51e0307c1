"""Loading a trained model (checkpoint or export) behind one interface, and scoring with it."""
