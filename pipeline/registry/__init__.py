"""The MLflow side: runs, registered versions and their lineage, plots, and what consumers load."""
