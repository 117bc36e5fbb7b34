"""Scaling laws: IsoFLOP sweeps (sweep.py) and the fits of Chinchilla's three approaches (fit.py)."""
