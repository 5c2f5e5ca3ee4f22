"""Datasets: the prepared-dataset layout (manifest.csv + images), preparation from raw sources, loading."""
